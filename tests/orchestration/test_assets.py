"""Data-aware scheduling: publishing a dataset version through the `publish_dataset` DAG emits an Asset event for the
subject's dataset, which queues a run of the subjects scheduled on new data (real Airflow, real DVC)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys

from conftest import REPO, SAMPLE

SUBJECTS = """
subjects:
  dog: {class_noun: dog, kind: live, schedule: "0 2 * * *", on_new_data: true}
  backpack: {class_noun: backpack, schedule: "0 3 * * *"}
"""


def test_publishing_a_version_emits_an_asset_event_that_queues_the_subjects_dag(tmp_path):
    from sd_tasks.data.dataset import PublishConfig, publish

    registry = tmp_path / "registry"
    publish(PublishConfig(source=str(SAMPLE), repo=str(registry), path="dog", tag="dog-v1",
                          remote=str(tmp_path / "dvc-remote")))
    photos = tmp_path / "home" / "incoming" / "dog-2026-12"  # the form names a folder of the incoming folder
    shutil.copytree(SAMPLE, photos)
    (photos / "00.jpg").unlink()  # the new version has one photo less
    (tmp_path / "subjects.yaml").write_text(SUBJECTS)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "DREAMLINE_HOME": str(tmp_path / "home"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_DATASET_REPO": str(registry),
           "DREAMLINE_SUBJECTS": str(tmp_path / "subjects.yaml")}
    airflow = [sys.executable, "-m", "airflow"]
    # The consumers must be known to the database, and unpaused: a paused DAG is not queued.
    for command in (["db", "migrate"], ["dags", "reserialize"], ["dags", "unpause", "lora_dog"],
                    ["dags", "unpause", "lora_backpack"]):
        subprocess.run([*airflow, *command], env=env, check=True, capture_output=True, cwd=REPO)
    conf = {"subject": "dog", "source": "dog-2026-12", "tag": "dog-v2"}
    proc = subprocess.run([*airflow, "dags", "test", "publish_dataset", "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, cwd=REPO)
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        [state] = db.execute("SELECT state FROM dag_run WHERE dag_id = 'publish_dataset'").fetchone()
        events = db.execute("SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
        queued = db.execute("SELECT q.target_dag_id, a.uri FROM asset_dag_run_queue q "
                            "JOIN asset a ON a.id = q.asset_id").fetchall()
    assert state == "success", (proc.stdout + proc.stderr)[-3000:]
    [(uri, extra)] = events
    assert uri == "dreamline://datasets/dog" and json.loads(extra)["tag"] == "dog-v2"
    assert queued == [("lora_dog", "dreamline://datasets/dog")]  # the backpack is not scheduled on the dog's data
    tags = subprocess.run(["git", "tag"], cwd=registry, capture_output=True, text=True, check=True).stdout.split()
    assert tags == ["dog-v1", "dog-v2"]


def test_only_a_folder_of_the_incoming_folder_can_be_published(tmp_path, monkeypatch):
    """The form names a folder inside DREAMLINE_INCOMING: an absolute path, `..`, or a link out of it (to ~/.ssh,
    to the stack's state) is refused before anything is copied into the data registry."""
    import pytest
    from airflow.sdk.definitions.param import ParamValidationError

    from dreamline.deployment import DeploymentError, from_environment

    incoming, secrets = tmp_path / "incoming", tmp_path / "ssh"
    (incoming / "dog-v2").mkdir(parents=True)
    secrets.mkdir()
    (incoming / "keys").symlink_to(secrets)
    deployment = from_environment({"DREAMLINE_HOME": str(tmp_path), "DREAMLINE_INCOMING": str(incoming)})
    assert deployment.incoming_folder("dog-v2") == str(incoming / "dog-v2")
    for name, says in ((str(secrets), "not a folder inside the incoming folder"), ("../ssh", "not a folder inside"),
                       ("keys", "not a folder inside"), (".", "not a folder inside"), ("dog-v3", "no such folder")):
        with pytest.raises(DeploymentError, match=says):
            deployment.incoming_folder(name)
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags" / "publish_dataset.py")).dags["publish_dataset"]
    for source in ("/home/me/.ssh", "../x", "a/../../b", ".hidden", ""):
        params = copy.deepcopy(dag.params)
        with pytest.raises(ParamValidationError):
            params.update({"source": source, "tag": "dog-v2"})
            params.validate()
