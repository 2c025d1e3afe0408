"""The whole DAG end to end through Airflow (`airflow dags test`), on the tiny model, into a fresh MLflow store."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from urllib.parse import quote

import pytest

from conftest import FOUR_PROMPTS, REPO

# lr 1e6 diverges: its train task fails and the sweep goes on with the other two.
CONF = {"subject": "dog", "dataset_version": "dog-v1", "learning_rates": [1e-3, 1e-4, 1e6], "max_steps": 4,
        "checkpointing_steps": 2, "resolution": 64, "images_per_prompt": 1, "inference_steps": 2,
        "confirmation_inference_steps": 2, "evaluation_prompts": FOUR_PROMPTS,
        "encode_shard_size": 2,  # 5 images: the encode is split over 3 mapped tasks and merged
        "prior_preservation": True, "num_class_images": 2,
        # The tiny random evaluators cannot see a subject, so no LoRA of theirs beats the base model: the dog's floor
        # is lowered to give the later nights a champion; the backpack keeps the default and stays challenger.
        "promotion_margin": -10}


# Two subjects in one registry, as a deployment's dags/subjects.yaml would list them.
SUBJECTS = """
subjects:
  dog: {token: sks, class_noun: dog, kind: live, dataset: {path: dog, version: dog-v1}}
  backpack: {token: zwx, class_noun: backpack, kind: object, dataset: {path: backpack, version: backpack-v1}}
  kim: {token: ohwx, class_noun: person, kind: person, dataset: {path: dog, version: dog-v1}}
"""
# kim is a person whose dataset version has no consent record (the dog's photos stand in for a person's)
PERSON_CONF = {k: v for k, v in CONF.items() if k not in ("subject", "dataset_version")}
BACKPACK_CONF = {**{k: v for k, v in CONF.items() if k not in ("subject", "dataset_version", "prior_preservation",
                                                                 "num_class_images", "encode_shard_size",
                                                                 "promotion_margin")},
                 # successive halving: both rates train to step 2, the better one on to 4
                 "learning_rates": [1e-3, 1e-4], "sweep_strategy": "halving", "halving_rungs": [2]}

# A batch with the dog's champion (the first night's): two prompts, one GPU task each, at two seeds.
BATCH_CONF = {"subject": "dog", "prompts": ["a photo of {instance}", "{instance} in the snow"], "seeds": [1, 2],
              "steps": 2}


@pytest.fixture(scope="module")
def nights(tmp_path_factory, models, registry):
    """Through `airflow dags test`: the dog trained (one learning rate diverging), the dog again with nothing
    changed, a second subject, the backpack, a batch, and a person without a consent record; with a webhook
    listening for failures."""
    from sd_tasks.data.dataset import PublishConfig, publish
    from test_notify import Receiver

    home = tmp_path_factory.mktemp("e2e-home")
    publish(PublishConfig(source=str(REPO / "sample_data" / "backpack"), repo=str(registry), path="backpack",
                          tag="backpack-v1"))
    (home / "subjects.yaml").write_text(SUBJECTS)
    webhook = Receiver()
    env = {**os.environ, "DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_DATASET_REPO": str(registry),
           "DREAMLINE_SUBJECTS": str(home / "subjects.yaml"), "DREAMLINE_BASE_MODEL": models["sdxl"],
           "DREAMLINE_CLIP_MODEL": models["clip"], "DREAMLINE_DINO_MODEL": models["dino"],
           "AIRFLOW_CONN_DREAMLINE_WEBHOOK": f"http://127.0.0.1:{webhook.port}/hooks/dreamline"}
    env.pop("MLFLOW_TRACKING_URI", None)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO)

    def night(name: str, dag_id: str, conf: dict) -> dict:
        proc = subprocess.run([*airflow, "dags", "test", dag_id, "-c", json.dumps(conf)], env=env,
                              capture_output=True, text=True, cwd=REPO)
        (home / f"{name}.log").write_text(proc.stdout + proc.stderr)
        with sqlite3.connect(home / "airflow" / "airflow.db") as db:
            (run_id, state), = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id DESC "
                                          "LIMIT 1", (dag_id,)).fetchall()
            tasks = [{"task_id": t, "map_index": m, "state": s, "try_number": n} for t, m, s, n in db.execute(
                "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (dag_id, run_id))]
        return {"proc": proc, "run_id": run_id, "state": state, "tasks": tasks, "log": proc.stdout + proc.stderr}

    try:
        runs = {"dog": night("dog", "lora_dog", CONF), "dog-again": night("dog-again", "lora_dog", CONF),
                "backpack": night("backpack", "lora_backpack", BACKPACK_CONF),
                "batch": night("batch", "batch_images", BATCH_CONF),
                "person": night("person", "lora_kim", PERSON_CONF)}
    finally:
        webhook.close()
    return {"home": home, **runs, "webhook": webhook.requests}


@pytest.fixture(scope="module")
def dag_run(nights):
    return {"home": nights["home"], **nights["dog"]}


@pytest.fixture(scope="module")
def client(dag_run):
    """A client of the DAG run's MLflow store. mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in the
    environment, so both are put back afterwards: later tests must not write into this store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{dag_run['home'] / 'mlflow' / 'mlflow.db'}")
    yield mlflow.MlflowClient()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(before or f"sqlite:///{os.environ['DREAMLINE_HOME']}/mlflow/mlflow.db")
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_dag_run_succeeds(dag_run):
    assert dag_run["proc"].returncode == 0, dag_run["proc"].stdout[-3000:]
    assert dag_run["state"] == "success", dag_run["log"][-5000:]


def test_the_demo_progress_reads_every_task_instance_off_the_runs_database(nights):
    """deploy/local/progress.py (make demo's per-task lines) on a real run's database: Airflow's own columns."""
    from deploy.local.progress import RunWatcher, airflow_database_url

    url = airflow_database_url({"AIRFLOW_HOME": str(nights["home"] / "airflow")})
    ended = RunWatcher(url, "lora_dog", after=0).poll()  # both of the dog's runs, in end order
    final = {(e.task_id, e.map_index): e.state for e in ended}  # in end order: the later run's state wins
    listed = {(t["task_id"], t["map_index"]): t["state"] for night in ("dog", "dog-again")
              for t in nights[night]["tasks"]}
    assert final == listed
    assert [e.name for e in ended if e.state == "failed"] == ["train [lr=1000000.0]"]
    assert all(e.seconds is not None and e.seconds >= 0 for e in ended if e.state != "skipped")
    # a task mapped over nothing (an unused rung of successive halving) is skipped without ever starting
    assert {e.name for e in ended if e.seconds is None} <= {f"rung_{n}.{t}" for n in (1, 2) for t in ("halve", "train",
                                                                                                      "evaluate")}


def test_a_diverging_learning_rate_fails_its_own_task_and_the_sweep_goes_on(dag_run):
    train = {t["map_index"]: t["state"] for t in dag_run["tasks"] if t["task_id"] == "train"}
    assert sorted(train.values()) == ["failed", "success", "success"], train
    log = dag_run["log"]
    assert "training diverged" in log and "not evaluated, their training failed: lr=1e+06" in log
    run = next((dag_run["home"] / "runs" / "lora_dog").glob("*/eval")).parent
    evaluated = sorted(p.name for p in run.glob("eval/lr-*/*"))
    assert evaluated == ["step-2", "step-2", "step-4", "step-4"]  # lr 1e-3 and 1e-4; lr 1e6 left no result
    assert (run / "eval" / "base" / "metrics.json").exists()  # the yardstick of normalised scores
    assert sorted(p.name for p in (run / "confirm").iterdir()) == ["base", "challenger"]  # no champion yet


def test_encode_was_sharded_and_merged_and_class_images_were_encoded(dag_run):
    manifests = [json.loads((c / "manifest.json").read_text()) for c in (dag_run["home"] / "cache" / "encode").iterdir()]
    instance = next(m for m in manifests if len(m["shards"]) == 3)
    assert instance["shards"] == [f"shard-0000{i}-of-00003" for i in range(3)] and len(instance["records"]) == 5
    [prior] = [m for m in manifests if m is not instance and "sks" not in m["records"][0]["caption"]
               and "zwx" not in m["records"][0]["caption"]]  # not the backpack's cache either
    assert [r["caption"] for r in prior["records"]] == ["a photo of dog"] * 2


def test_champion_version_carries_its_lineage(dag_run, client, registry):
    version = client.get_model_version_by_alias("dog-sdxl-lora", "champion")
    assert str(version.version) == "1" and sorted(version.aliases) == ["challenger", "champion"]
    assert float(version.tags["score.preservation"]) <= 1 and re.fullmatch(r"[0-9a-f]{40}(-dirty\.[0-9a-f]{12})?", version.tags["code_version"])
    tags = version.tags
    assert tags["dataset.rev"] == "dog-v1" and tags["dataset.hash"].startswith("sha256:")
    assert tags["dataset.repo"] == str(registry) and len(tags["dataset.commit"]) == 40
    assert tags["learning_rate"] in ("0.001", "0.0001") and tags["step"] in ("2", "4")
    assert tags["base_model"].endswith("tiny-sdxl")
    assert "Dataset: `dog` at `dog-v1`" in version.description


def test_parent_run_has_one_nested_run_per_learning_rate_with_curves_metrics_and_images(dag_run, client):
    experiment = client.get_experiment_by_name("dog")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    version = client.get_model_version_by_alias("dog-sdxl-lora", "champion")
    for run in [*parents, *children]:  # the dataset's lineage is on every run
        assert run.data.tags["dataset.rev"] == "dog-v1"
        assert run.data.tags["dataset.hash"] == version.tags["dataset.hash"]
    statuses = {r.data.params["learning_rate"]: r.info.status for r in children}
    assert statuses == {"0.0001": "FINISHED", "0.001": "FINISHED", "1000000.0": "FAILED"}
    [diverged] = [r for r in children if r.info.status == "FAILED"]
    assert "training diverged" in diverged.data.tags["dreamline.error"]
    for child in (r for r in children if r.info.status == "FINISHED"):
        run_id = child.info.run_id
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
        for metric in ("eval/dino", "eval/clip_i", "eval/clip_t"):
            assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [2, 4]
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        assert len(images) >= 4, images  # 2 prompts x 2 checkpoints
    parent_artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    assert {"selection.json", "report.md", "review"} <= set(parent_artifacts)
    review = {a.path.split("/")[-1] for a in client.list_artifacts(parents[0].info.run_id, "review")}
    assert {"grid-prompt-00.png", "grid-prompt-01.png", "dino-vs-step.png", "clip_t-vs-step.png",
            "preservation-vs-step.png", "score-vs-step.png"} <= review
    report = open(client.download_artifacts(parents[0].info.run_id, "report.md")).read()
    assert "Promoted to champion: first version: subject fidelity against the base model " in report
    assert "% interval " in report and "above the margin -10" in report and "base model" in report
    assert re.search(r"on 2 prompts \(\d+ images\)", report)  # what the interval rests on: the 2 held-out prompts
    assert re.search(r"The screen flagged none of the \d+ evaluation images", report)  # NudeNet, for real
    import mlflow  # every evaluated checkpoint is a LoggedModel of its training run, ranked by select's score

    models = [m for m in mlflow.search_logged_models(  # besides the registered version's `lora`
        experiment_ids=[experiment.experiment_id], output_format="list",
        order_by=[{"field_name": "metrics.eval/score", "ascending": False}]) if m.model_type == "lora-checkpoint"]
    assert sorted(m.name for m in models) == ["lr-0_0001-step-2", "lr-0_0001-step-4", "lr-0_001-step-2",
                                              "lr-0_001-step-4"]
    assert {m.source_run_id for m in models} == {r.info.run_id for r in children if r.info.status == "FINISHED"}
    best = f"lr-{version.tags['learning_rate'].replace('.', '_')}-step-{version.tags['step']}"
    assert models[0].name == best  # the registered checkpoint ranks first


def test_registered_lora_loads_back_and_generates_offline(dag_run, client):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/dog-sdxl-lora@champion")
    images = model.predict({"prompt": ["a photo of sks dog"]},
                           params={"num_inference_steps": 2, "height": 64, "width": 64})
    assert images[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_a_refused_step_fails_at_once_and_the_webhook_hears_of_it(nights):
    [diverged] = [t for t in nights["dog"]["tasks"] if t["task_id"] == "train" and t["state"] == "failed"]
    assert diverged["try_number"] == 1  # exit 65: StepRefused, no retry
    [posted] = [r["body"] for r in nights["webhook"] if r["body"]["dag_id"] == "lora_dog"]  # its one failure
    assert (posted["event"], posted["dag_id"], posted["task_id"], posted["map_index"], posted["try_number"]) == \
        ("failure", "lora_dog", "train", diverged["map_index"], 1)
    assert posted["error"].startswith("error: train: ") and "training diverged" in posted["error"]
    assert f"/dags/lora_dog/runs/{quote(nights['dog']['run_id'], safe='')}/tasks/train" in posted["log_url"]


def test_a_night_with_nothing_changed_ends_skipped_in_seconds_without_training(nights, client):
    again = nights["dog-again"]
    assert again["state"] == "success", again["log"][-3000:]
    states = {t["task_id"]: t["state"] for t in again["tasks"]}
    before = ("recipe", "models_to_pin", "models", "dataset", "champion", "lineage", "anything_to_train")
    assert {k: states[k] for k in before} == dict.fromkeys(before, "success")
    assert {s for t, s in states.items() if t not in before} == {"skipped"}
    assert "nothing to train: nothing changed since v1 (champion) was trained: same dataset content, recipe, " \
           "base model, code version" in again["log"]
    parents = [r for r in client.search_runs([client.get_experiment_by_name("dog").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # no MLflow run was opened for the skipped night
    assert len(client.search_model_versions("name = 'dog-sdxl-lora'")) == 1


def test_approval_off_nothing_waits(nights):
    for night in ("dog", "backpack"):
        states = {t["task_id"]: t["state"] for t in nights[night]["tasks"]}
        assert states["register"] == "success"
        assert states["approval_needed"] == "success" and states["approval"] == states["promote"] == "skipped"


def test_a_first_version_that_does_not_beat_the_base_model_stays_challenger(nights, client):
    """The backpack keeps the default margin: the tiny model's LoRA is no better than the base model."""
    log = nights["backpack"]["log"]
    assert "first version: subject fidelity against the base model" in log
    assert "does not lie above the margin 0.1" in log
    assert client.get_registered_model("backpack-sdxl-lora").aliases == {"challenger": 1}


def test_two_subjects_have_separate_lineage(nights, client):
    assert nights["backpack"]["state"] == "success", nights["backpack"]["log"][-3000:]
    dog = client.get_model_version_by_alias("dog-sdxl-lora", "champion")
    backpack = client.get_model_version_by_alias("backpack-sdxl-lora", "challenger")
    assert (str(backpack.version), backpack.tags["dataset.path"], backpack.tags["dataset.rev"]) == ("1", "backpack",
                                                                                               "backpack-v1")
    assert backpack.tags["lineage.dataset_hash"] != dog.tags["lineage.dataset_hash"]
    assert backpack.tags["lineage.recipe_hash"] != dog.tags["lineage.recipe_hash"]
    runs = client.search_runs([client.get_experiment_by_name("backpack").experiment_id])
    assert runs and all(r.data.tags["dataset.path" if "dataset.path" in r.data.tags else "dataset.rev"]
                        .startswith("backpack") for r in runs)
    folders = sorted(p.name for p in (nights["home"] / "runs").iterdir())
    assert folders == ["batch_images", "lora_backpack", "lora_dog", "lora_kim"]


def test_successive_halving_stops_the_losing_rate_at_its_rung_and_the_survivor_resumes(nights):
    states = {(t["task_id"], t["map_index"]): t["state"] for t in nights["backpack"]["tasks"]}
    assert states[("rung_1.halve", 0)] == states[("rung_1.train", 0)] == states[("rung_1.evaluate", 0)] == "success"
    assert ("rung_1.train", 1) not in states  # one of two kept
    rung_2 = {task: s for (task, _), s in states.items() if task.startswith("rung_2.")}
    assert rung_2.pop("rung_2.halving") == "success" and set(rung_2.values()) == {"skipped"}  # only one rung asked
    run = next((nights["home"] / "runs" / "lora_backpack").iterdir())
    decision = json.loads((run / "sweep" / "rung-2" / "halving.json").read_text())
    [kept], [stopped] = decision["kept"], decision["stopped"]
    steps = {lr: sorted(p.name for p in (run / "train" / f"lr-{lr:g}").glob("checkpoint-*")) for lr in (kept, stopped)}
    assert steps == {kept: ["checkpoint-2", "checkpoint-4"], stopped: ["checkpoint-2"]}
    assert sorted(p.name for p in (run / "eval" / f"lr-{stopped:g}").iterdir()) == ["step-2"]
    assert sorted(p.name for p in (run / "eval" / f"lr-{kept:g}").iterdir()) == ["step-2", "step-4"]
    selection = json.loads((run / "select" / "selection.json").read_text())
    assert [r["stopped"] for r in selection["halving"]] == [[stopped]] and selection["missing"] == []
    assert f"rung 2: keeping lr={kept:g}; stopping lr={stopped:g}" in nights["backpack"]["log"]


def test_the_nights_cost_is_on_the_registered_version_and_the_parent_run(nights, client):
    run = next((nights["home"] / "runs" / "lora_backpack").iterdir())
    records = {p.name for p in (run / "cost").iterdir()}
    assert {"train.0.try-1.json", "train.1.try-1.json", "rung_1.train.0.try-1.json", "rung_1.halve.0.try-1.json",
            "evaluate.0.try-1.json", "validate.try-1.json", "select.try-1.json"} <= records
    version = client.get_model_version_by_alias("backpack-sdxl-lora", "challenger")
    seconds = sum(json.loads((run / "cost" / name).read_text())["seconds"] for name in records
                  if not name.startswith(("register.", "promote.", "close_mlflow_run.")))  # recorded after it
    assert float(version.tags["cost.seconds"]) == pytest.approx(seconds, abs=0.2)
    assert version.tags["cost.gpu_seconds"] == "0.0" and version.tags["cost.estimated_price"] == "0.00"  # no GPU
    runs = client.search_runs([client.get_experiment_by_name("backpack").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["cost/seconds"] == pytest.approx(seconds, abs=0.2)
    assert parent.data.metrics["halving/saved_seconds"] > 0
    report = open(client.download_artifacts(parent.info.run_id, "report.md")).read()
    assert "| train | train | 2 | 2 |" in report and "| rung_1.train | train | 1 | 1 |" in report  # 2 rates, 1 kept
    assert "Successive halving" in report and "against the full grid" in report


def test_a_batch_renders_each_prompt_in_the_gpu_pool_with_the_champion_and_logs_one_grid(nights, client):
    batch = nights["batch"]
    assert batch["state"] == "success", batch["log"][-5000:]
    with sqlite3.connect(nights["home"] / "airflow" / "airflow.db") as db:
        rendered = db.execute("SELECT map_index, state, pool FROM task_instance WHERE dag_id = 'batch_images' AND "
                              "run_id = ? AND task_id = 'render' ORDER BY map_index", (batch["run_id"],)).fetchall()
    assert rendered == [(0, "success", "gpu"), (1, "success", "gpu")]
    champion = str(client.get_model_version_by_alias("dog-sdxl-lora", "champion").version)
    [run] = client.search_runs([client.get_experiment_by_name("dog-batches").experiment_id])
    assert (run.data.tags["model"], run.data.tags["version"], run.data.tags["kind"]) == ("dog-sdxl-lora", champion,
                                                                                        "batch")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"grid.png", "images"}
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images/prompt-2")}
    assert images >= {"images/prompt-2/images.json", "images/prompt-2/seed-1.png", "images/prompt-2/seed-2.png"}


def test_a_person_without_a_consent_record_is_refused_at_the_dataset_task_before_any_gpu_task(nights):
    person = nights["person"]
    states = {t["task_id"]: t["state"] for t in person["tasks"]}
    assert person["state"] == "failed" and states["dataset"] == "failed", states
    [refused] = [t for t in person["tasks"] if t["task_id"] == "dataset"]
    assert refused["try_number"] == 1  # exit 65: refused, not retried
    ran = {t["task_id"].split(".")[-1] for t in person["tasks"] if t["state"] in ("success", "running", "failed")}
    assert not ran & {"encode", "class_images", "train", "evaluate", "confirm"}, ran
    [posted] = [r["body"] for r in nights["webhook"] if r["body"]["dag_id"] == "lora_kim"]
    assert posted["task_id"] == "dataset" and "no consent record" in posted["error"], posted["error"]
    [run] = (nights["home"] / "runs" / "lora_kim").iterdir()
    assert not (run / "dataset").exists()  # not one photo fetched
