"""Nights with the real model ids, as a deployment with no model settings runs them: the Hugging Face Hub is a
local fake (tests/fake_hub.py) serving the tiny models under stabilityai/..., openai/... and facebook/..., by commit.

Three nights of `airflow dags test`: the first downloads, pins and registers; the second comes after the hub moved
SDXL to a new commit, and trains again saying why; the third has no hub and an empty model cache, and ends in one
line before anything is trained.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest

from conftest import FOUR_PROMPTS, REPO
from fake_hub import REAL_IDS, UNUSED, FakeHub, folder_files

SDXL = REAL_IDS["sdxl"]
CONF = {"subject": "dog", "dataset_version": "dog-v1", "learning_rates": [1e-4], "max_steps": 2,
        "checkpointing_steps": 2, "resolution": 64, "images_per_prompt": 1, "inference_steps": 2,
        "confirmation_inference_steps": 2, "evaluation_prompts": FOUR_PROMPTS, "confirmation_images_per_prompt": 1}


@pytest.fixture(scope="module")
def nights(tmp_path_factory, models, registry):
    home = tmp_path_factory.mktemp("real-ids-home")
    hub = FakeHub()
    first = {k: hub.publish(REAL_IDS[k], folder_files(models[k], UNUSED["pipeline" if k == "sdxl" else "model"]))
             for k in REAL_IDS}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DREAMLINE_", "MLFLOW_TRACKING_URI"))}
    env |= {"DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_DATASET_REPO": str(registry),
            "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home / "hf"), "DREAMLINE_RETRY_DELAY": "0"}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO)
    before = set(os.listdir(REPO))

    def night(name: str, **extra) -> dict:
        proc = subprocess.run([*airflow, "dags", "test", "lora_dog", "-c", json.dumps(CONF)], env={**env, **extra},
                              capture_output=True, text=True, cwd=REPO)
        (home / f"{name}.log").write_text(proc.stdout + proc.stderr)
        with sqlite3.connect(home / "airflow" / "airflow.db") as db:
            (run_id, state), = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = 'lora_dog' ORDER BY id "
                                          "DESC LIMIT 1").fetchall()
            tasks = {(t, m): (s, n) for t, m, s, n in db.execute(
                "SELECT task_id, map_index, state, try_number FROM task_instance WHERE run_id = ?", (run_id,))}
        return {"state": state, "tasks": tasks, "log": proc.stdout + proc.stderr}

    try:
        runs = {"first": night("first")}
        files = folder_files(models["sdxl"], UNUSED["pipeline"])
        files["scheduler/scheduler_config.json"] = files["scheduler/scheduler_config.json"].replace(
            b"{", b'{"moved": true, ', 1)
        moved = hub.publish(SDXL, files)
        runs["moved"] = night("moved")
        hub.stop()
        runs["down"] = night("down", HF_HOME=str(home / "empty-hf"))
    finally:
        hub.stop()
    return {"home": home, "hub": hub, "tracking_uri": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", "first_shas": first, "moved_sha": moved, "written": set(os.listdir(REPO)) -
            before, **runs}


@pytest.fixture(scope="module")
def client(nights):
    from mlflow import MlflowClient

    return MlflowClient(nights["tracking_uri"])


def test_a_night_with_the_real_ids_fetches_pins_trains_and_registers_every_model_as_id_at_sha(nights, client):
    assert nights["first"]["state"] == "success", nights["first"]["log"][-5000:]
    shas = nights["first_shas"]
    version = client.get_model_version("dog-sdxl-lora", "1")
    pinned = {"base_model": f"{SDXL}@{shas['sdxl']}", "clip_model": f"{REAL_IDS['clip']}@{shas['clip']}",
              "dino_model": f"{REAL_IDS['dino']}@{shas['dino']}"}
    assert {k: version.tags.get(f"model.{k}") for k in pinned} == pinned
    assert version.tags["base_model"] == version.tags["lineage.base_model"] == pinned["base_model"]
    assert pinned["clip_model"] in version.description and pinned["base_model"] in version.description
    # MLflow's flavor records the id and the commit trained on: models:/ loads those weights, not today's main
    import mlflow
    import yaml

    mlmodel = mlflow.artifacts.download_artifacts(
        f"{client.get_model_version_download_uri('dog-sdxl-lora', '1')}/MLmodel", dst_path=str(nights["home"] / "v1"),
        tracking_uri=nights["tracking_uri"])
    flavor = yaml.safe_load(open(mlmodel))["flavors"]["diffusers"]
    assert (flavor["base_model"], flavor["base_model_revision"]) == (SDXL, shas["sdxl"])
    # every download was a file the steps load, each fetched once; none was made in the checkout
    fetched = nights["hub"].downloads  # both nights': the second fetched only what the new commit changed
    assert not [f for f in fetched if f.split("/", 2)[2] in UNUSED["pipeline"] + UNUSED["model"]]
    assert [f for f in set(fetched) if fetched.count(f) > 1] == [f"{SDXL}/scheduler/scheduler_config.json"]
    assert nights["written"] == set() and not (REPO / "stabilityai").exists()


def test_a_new_commit_upstream_is_a_changed_base_model_and_the_next_night_trains(nights, client):
    moved = nights["moved"]
    assert moved["state"] == "success", moved["log"][-5000:]
    old, new = nights["first_shas"]["sdxl"][:12], nights["moved_sha"][:12]
    assert f"training: v1 (champion): changed base model ({SDXL}@{old} -> {SDXL}@{new})" in moved["log"] or \
        f"training: v1 (challenger): changed base model ({SDXL}@{old} -> {SDXL}@{new})" in moved["log"]
    assert moved["tasks"][("train", 0)][0] == "success"
    assert client.get_model_version("dog-sdxl-lora", "2").tags["base_model"] == f"{SDXL}@{nights['moved_sha']}"


def test_a_night_without_the_hub_or_a_cached_model_ends_in_one_line_before_any_training(nights, client):
    down = nights["down"]
    assert down["state"] == "failed"
    state, tries = down["tasks"][("models", -1)]
    assert state == "failed" and tries == 3  # retried: the hub may come back
    # the same one line each try, as the step printed it and as the task's failure (log decorations aside)
    errors = set(re.findall(r"error: (pin-models: .*?could not be reached \(.*?\))", down["log"]))
    assert len(errors) == 1, errors
    assert errors.pop().startswith(f"pin-models: --base-model {SDXL}: not in the model cache")
    assert all(down["tasks"][(t, -1)][0] in ("upstream_failed", None) for t in ("lineage", "mlflow_run", "validate")
               if (t, -1) in down["tasks"])
    assert not any(t == "train" and s == "success" for (t, _), (s, _) in down["tasks"].items())
    assert len(client.search_model_versions("name = 'dog-sdxl-lora'")) == 2  # nothing new registered
