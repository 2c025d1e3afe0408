"""The whole DAG end to end through Airflow (`airflow dags test`), on the tiny model, into a fresh MLflow store."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# lr 1e6 diverges: its train task fails and the sweep goes on with the other two.
CONF = {"subject": "dog", "dataset_version": "dog-v1", "learning_rates": [1e-3, 1e-4, 1e6], "max_steps": 4,
        "checkpointing_steps": 2, "resolution": 64, "images_per_prompt": 1, "inference_steps": 2,
        "evaluation_prompts": ["a {instance} in the snow", "a red {instance}"],
        "encode_shard_size": 2,  # 5 images: the encode is split over 3 mapped tasks and merged
        "prior_preservation": True, "num_class_images": 2}


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory, models, registry):
    home = tmp_path_factory.mktemp("e2e-home")
    env = {**os.environ, "DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_DATASET_REPO": str(registry),
           "DREAMLINE_BASE_MODEL": models["sdxl"], "DREAMLINE_CLIP_MODEL": models["clip"],
           "DREAMLINE_DINO_MODEL": models["dino"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO)
    proc = subprocess.run([*airflow, "dags", "test", "sdxl_dreambooth_lora", "-c", json.dumps(CONF)], env=env,
                          capture_output=True, text=True, cwd=REPO)
    (home / "dags-test.log").write_text(proc.stdout + proc.stderr)
    runs = subprocess.run([*airflow, "dags", "list-runs", "sdxl_dreambooth_lora", "-o", "json"], env=env,
                          capture_output=True, text=True, check=True, cwd=REPO)
    listing = next(line for line in reversed(runs.stdout.splitlines()) if line.startswith("["))  # after log lines
    run_id = json.loads(listing)[0]["run_id"]
    tasks = subprocess.run([*airflow, "tasks", "states-for-dag-run", "sdxl_dreambooth_lora", run_id, "-o", "json"],
                           env=env, capture_output=True, text=True, check=True, cwd=REPO)
    states = json.loads(next(line for line in reversed(tasks.stdout.splitlines()) if line.startswith("[")))
    return {"home": home, "proc": proc, "runs": json.loads(listing), "tasks": states}


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
    assert [r["state"] for r in dag_run["runs"]] == ["success"], (dag_run["home"] / "dags-test.log").read_text()[-5000:]


def test_the_demo_progress_reads_every_task_instance_off_the_runs_database(dag_run):
    """deploy/local/progress.py (make demo's per-task lines) on a real run's database: Airflow's own columns."""
    from deploy.local.progress import RunWatcher, airflow_database_url

    url = airflow_database_url({"AIRFLOW_HOME": str(dag_run["home"] / "airflow")})
    ended = RunWatcher(url, dag_run["runs"][0]["dag_id"], after=0).poll()
    final = {(e.task_id, e.map_index): e.state for e in ended}  # in end order: a retry's last attempt wins
    listed = {(t["task_id"], int(t["map_index"]) if t["map_index"] not in ("", None) else -1): t["state"]
              for t in dag_run["tasks"]}  # the CLI lists an unmapped task's map index as ""
    assert final == listed
    assert [e.name for e in ended if e.state == "failed"] == ["train [lr=1000000.0]"]
    assert all(e.seconds is not None and e.seconds >= 0 for e in ended)


def test_a_diverging_learning_rate_fails_its_own_task_and_the_sweep_goes_on(dag_run):
    train = {t["map_index"]: t["state"] for t in dag_run["tasks"] if t["task_id"] == "train"}
    assert sorted(train.values()) == ["failed", "success", "success"], train
    log = (dag_run["home"] / "dags-test.log").read_text()
    assert "training diverged" in log and "not evaluated, their training failed: lr=1e+06" in log
    evaluated = sorted(p.name for p in (dag_run["home"] / "runs").glob("*/*/eval/*/*"))
    assert evaluated == ["step-2", "step-2", "step-4", "step-4"]  # lr 1e-3 and 1e-4; lr 1e6 left no result


def test_encode_was_sharded_and_merged_and_class_images_were_encoded(dag_run):
    manifests = [json.loads((c / "manifest.json").read_text()) for c in (dag_run["home"] / "cache" / "encode").iterdir()]
    instance = next(m for m in manifests if len(m["shards"]) == 3)
    assert instance["shards"] == [f"shard-0000{i}-of-00003" for i in range(3)] and len(instance["records"]) == 5
    [prior] = [m for m in manifests if m is not instance]
    assert [r["caption"] for r in prior["records"]] == ["a photo of dog"] * 2


def test_champion_version_carries_its_lineage(dag_run, client, registry):
    version = client.get_model_version_by_alias("dog-sdxl-lora", "champion")
    assert str(version.version) == "1" and sorted(version.aliases) == ["challenger", "champion"]
    assert float(version.tags["score.preservation"]) <= 1 and len(version.tags["code_version"]) == 40
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
    report = client.download_artifacts(parents[0].info.run_id, "report.md")
    assert "Promoted to champion: first version" in open(report).read()


def test_registered_lora_loads_back_and_generates_offline(dag_run, client):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/dog-sdxl-lora@champion")
    images = model.predict({"prompt": ["a photo of sks dog"]},
                           params={"num_inference_steps": 2, "height": 64, "width": 64})
    assert images[0][:8] == b"\x89PNG\r\n\x1a\n"
