"""`make stack` for real: PostgreSQL, SeaweedFS, the MLflow server and Airflow's four components as processes, from
an empty folder, driven as a user would (the stack CLI, publish-dataset, Airflow's REST API v2), then torn down.

Marked `stack`: `make test` leaves it out, `make test-stack` runs it (a few minutes on 2 cores). Nothing is mocked.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE
from deploy.local.bootstrap import s3_client
from deploy.local.processes import leftovers
from deploy.local.seaweedfs import free_port_pairs, is_free
from deploy.local.settings import Stack
from sd_tasks.storage import MARKER

pytestmark = pytest.mark.stack

DAG_ID, RUN_ID = "sdxl_dreambooth_lora", "stack-test"
CONF = {"subject": "dog", "dataset_version": "dog-v1", "learning_rates": [1e-3, 1e-4], "max_steps": 4,
        "checkpointing_steps": 2, "resolution": 64, "images_per_prompt": 1, "inference_steps": 2,
        "evaluation_prompts": ["a {instance} in the snow", "a red {instance}"]}
RUN_TIMEOUT = 900  # seconds; a run takes 2 to 3 minutes on 2 idle cores
# What may hold files in the stack folder after a run: the services' own folders, the models and the registry, and
# the scratch folder's caches. Everything a run produced must be in S3 (and PostgreSQL).
SERVICE_DATA = {"postgres", "s3", "models", "registry"}
CONTROL_FILES = {".lock", "stack.json", "stack.env"}


def stack_cli(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.local.stack", "--folder", str(folder), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def repo_state() -> set[str]:
    """The repo's changed, untracked and ignored paths, but for bytecode and pytest's own cache."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack brought up from nothing on free loopback ports, with scheduled runs off (else unpausing the DAG
    makes the scheduler queue a run for the last 02:00: catchup=False still runs the latest interval). Torn down
    at the end whatever happened."""
    folder = tmp_path_factory.mktemp("stack")
    repo_before = repo_state()
    airflow, mlflow, s3, postgres = free_port_pairs(4)
    began = time.monotonic()
    up = stack_cli(folder, "up", "--airflow-port", str(airflow), "--mlflow-port", str(mlflow), "--s3-port", str(s3),
                   "--postgres-port", str(postgres), "--schedules", "off", "--no-sample")
    up_seconds = time.monotonic() - began
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"folder": folder, "settings": Stack.load(folder), "up": up, "up_seconds": up_seconds,
               "repo_before": repo_before}
    finally:
        stack_cli(folder, "down", "--timeout", "20")


@pytest.fixture(scope="module")
def api(stack):
    import requests

    settings = stack["settings"]
    session = requests.Session()
    session.trust_env = False  # loopback only, never a proxy
    token = session.post(f"{settings.airflow_url}/auth/token", timeout=30,
                         json={"username": "admin", "password": settings.secrets["airflow_admin_password"]})
    assert token.status_code in (200, 201), token.text
    session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    session.base = f"{settings.airflow_url}/api/v2"
    return session


@pytest.fixture(scope="module")
def dag_run(stack, api):
    """Publish the sample subject, unpause and trigger the DAG through the REST API, wait for the run to end."""
    settings: Stack = stack["settings"]
    env = {**settings.base_env(), **settings.deployment_env(), "PYTHONPATH": str(REPO)}
    publish = subprocess.run([sys.executable, "-m", "sd_tasks", "publish-dataset", "--source", str(SAMPLE),
                              "--repo", str(settings.registry), "--path", "dog", "--tag", "dog-v1",
                              "--remote", f"s3://{settings.bucket}/dvc"], cwd=REPO, env=env, capture_output=True,
                             text=True)
    assert publish.returncode == 0, publish.stderr[-3000:]

    deadline = time.monotonic() + 180  # the dag-processor parses dags/ soon after it starts
    while (dag := api.get(f"{api.base}/dags/{DAG_ID}")).status_code == 404 and time.monotonic() < deadline:
        time.sleep(2)
    assert dag.status_code == 200, (dag.text, api.get(f"{api.base}/importErrors").text)
    assert api.patch(f"{api.base}/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    trigger = api.post(f"{api.base}/dags/{DAG_ID}/dagRuns",
                       json={"dag_run_id": RUN_ID, "logical_date": None, "conf": CONF})
    assert trigger.status_code == 200, trigger.text

    began = time.monotonic()
    while (run := api.get(f"{api.base}/dags/{DAG_ID}/dagRuns/{RUN_ID}").json())["state"] not in ("success", "failed"):
        assert time.monotonic() - began < RUN_TIMEOUT, f"run still {run['state']} after {RUN_TIMEOUT} s"
        time.sleep(5)
    seconds = time.monotonic() - began
    print(f"\nstack up from nothing: {stack['up_seconds']:.0f} s; DAG run {run['state']} in {seconds:.0f} s", flush=True)
    tasks = api.get(f"{api.base}/dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances", params={"limit": 100}).json()
    return {"run": run, "seconds": seconds, "tasks": tasks["task_instances"]}


def failed_task_logs(stack, tasks: list[dict]) -> str:
    """The end of each failed or retried task's log, read where the components wrote them."""
    logs = stack["folder"] / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}"
    parts = []
    for t in tasks:
        if t["state"] in ("failed", "upstream_failed") or t["try_number"] > 1:
            mapped = f"map_index={t['map_index']}/" if t["map_index"] >= 0 else ""
            for log in sorted((logs / f"task_id={t['task_id']}").glob(f"{mapped}attempt=*.log")):
                events = [json.loads(line).get("event", "") for line in log.read_text().splitlines()
                          if line.startswith("{")]
                parts.append(f"--- {log.relative_to(logs)} ({t['state']})\n" + "\n".join(map(str, events[-25:])))
    return "\n".join(parts) or "no task failed"


def bucket_keys(settings: Stack, prefix: str) -> list[str]:
    pages = s3_client(settings).get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def query(settings: Stack, database: str, sql: str, *args) -> list[tuple]:
    """Rows straight from the stack's PostgreSQL, as the database's own user."""
    from deploy.local.postgres import connect

    conn = connect(settings.ports["postgres"], database, settings.secrets[f"{database}_db_password"], database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_up_prints_where_everything_is_and_a_second_up_starts_nothing(stack):
    settings: Stack = stack["settings"]
    out = stack["up"].stdout
    assert settings.airflow_url in out and settings.mlflow_url in out and settings.s3_endpoint in out
    assert f"admin / {settings.secrets['airflow_admin_password']}" in out
    for name in ("stack.json", "stack.env", "s3/identities.json", "airflow/passwords.json"):
        assert (stack["folder"] / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    assert stack["folder"].stat().st_mode & 0o077 == 0  # logs and records: the stack's user's alone
    pids = {p.name: p.read_text() for p in (stack["folder"] / "pids").iterdir()}
    assert len(pids) == 7
    # no secret in a command line, which every local user can read in /proc
    secrets = [v for v in settings.secrets.values() if len(v) >= 8]
    for process in leftovers(stack["folder"]):
        assert not [v for v in secrets if v in " ".join(process.cmdline())], process.cmdline()[:4]
    again = stack_cli(stack["folder"], "up", "--no-sample")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 7, again.stdout
    assert {p.name: p.read_text() for p in (stack["folder"] / "pids").iterdir()} == pids
    assert stack_cli(stack["folder"], "status").returncode == 0


def test_s3_refuses_other_keys(stack):
    import boto3
    import botocore.exceptions

    settings: Stack = stack["settings"]
    assert settings.bucket in {b["Name"] for b in s3_client(settings).list_buckets()["Buckets"]}
    stranger = boto3.client("s3", endpoint_url=settings.s3_endpoint, aws_access_key_id="stranger",
                            aws_secret_access_key="not-the-secret", region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        stranger.list_objects_v2(Bucket=settings.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_the_dag_run_triggered_through_the_rest_api_succeeds(stack, dag_run):
    assert dag_run["run"]["state"] == "success", failed_task_logs(stack, dag_run["tasks"])
    states = {(t["task_id"], t["map_index"]): t["state"] for t in dag_run["tasks"]}
    assert [states[("train", i)] for i in (0, 1)] == ["success", "success"]
    assert sorted(s for (task, _), s in states.items() if task == "evaluate") == ["success"] * 4
    assert states[("register", -1)] == "success"


def test_airflow_ran_on_postgres_and_made_no_scheduled_run(stack, dag_run):
    time.sleep(5)  # with schedules on, the scheduler would queue the 02:00 run within a loop or two of ours ending
    runs = query(stack["settings"], "airflow", "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = %s", DAG_ID)
    assert runs == [(RUN_ID, "manual", "success")]


def test_every_artifact_of_the_run_is_in_s3(stack, dag_run):
    settings: Stack = stack["settings"]
    run = f"runs/{DAG_ID}/{RUN_ID}/"
    keys = [k.removeprefix(run) for k in bucket_keys(settings, run)]
    images = sorted(p.name for p in SAMPLE.iterdir())
    assert sorted(k for k in keys if k.startswith("dataset/")) == [f"dataset/{MARKER}", "dataset/dataset.json",
                                                                   *[f"dataset/images/{n}" for n in images]]
    for folder in ("validated", "captions", "resized", "select", "register"):  # each one whole
        assert f"{folder}/{MARKER}" in keys, f"no whole {folder}/ in s3://{settings.bucket}/{run}"
    checkpoints = {k.split("/")[1] + "/" + k.split("/")[2] for k in keys if k.startswith("train/")}
    assert checkpoints == {f"lr-{lr}/checkpoint-{step}" for lr in ("0.001", "0.0001") for step in (2, 4)}
    for checkpoint in checkpoints:
        assert any(k.startswith(f"train/{checkpoint}/") and k.endswith(".safetensors") for k in keys), checkpoint
        assert f"train/{checkpoint}/{MARKER}" in keys, checkpoint
    evaluations = {"/".join(k.split("/")[1:3]) for k in keys if k.startswith("eval/")}
    assert evaluations == {f"lr-{lr}/step-{step}" for lr in ("0.001", "0.0001") for step in (2, 4)}
    assert not [k for k in keys if ".staging-" in k]  # no writer was cut short
    assert any(k.startswith("cache/encode/") and k.endswith("manifest.json") for k in bucket_keys(settings, "cache/"))
    assert len([k for k in bucket_keys(settings, "dvc/") if not k.endswith(".dir")]) == len(images)


def test_registered_version_and_lineage_are_in_mlflows_postgres(stack, dag_run):
    settings: Stack = stack["settings"]
    aliases = query(settings, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                    "dog-sdxl-lora")
    assert sorted(aliases) == [("challenger", 1), ("champion", 1)]
    tags = dict(query(settings, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1",
                      "dog-sdxl-lora"))
    dataset = json.loads(s3_client(settings).get_object(
        Bucket=settings.bucket, Key=f"runs/{DAG_ID}/{RUN_ID}/dataset/dataset.json")["Body"].read())
    assert tags["dataset.rev"] == "dog-v1" and tags["dataset.hash"] == dataset["hash"]
    assert tags["dataset.hash"].startswith("sha256:") and tags["dataset.commit"] == dataset["commit"]
    code = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["code_version"] == code
    assert tags["learning_rate"] in ("0.001", "0.0001") and tags["step"] in ("2", "4")


def test_mlflow_artifacts_went_through_the_server_to_s3(stack, dag_run):
    settings: Stack = stack["settings"]
    [(location,)] = query(settings, "mlflow", "SELECT artifact_location FROM experiments WHERE name = 'dog'")
    run_ids = [r for (r,) in query(settings, "mlflow", "SELECT run_uuid FROM runs JOIN experiments e USING "
                                                        "(experiment_id) WHERE e.name = 'dog'")]
    assert location.startswith("mlflow-artifacts:/"), location  # proxied: clients never see S3
    keys = bucket_keys(settings, "mlflow/")
    assert any(k.endswith("report.md") for k in keys) and any(k.endswith(".png") for k in keys)
    assert any(k.endswith(".safetensors") and "/models/" in k for k in keys)  # the registered LoRA
    assert len(run_ids) == 3 and {k.split("/")[2] for k in keys} >= set(run_ids)  # parent + one per learning rate


def test_tomorrows_run_fetches_the_champion_from_the_mlflow_server(stack, dag_run):
    """The `champion` step as the next run would run it: the registered LoRA downloaded through the server (the
    download is not left in the step's temp folder: the next test looks), written to S3, the registered bytes."""
    settings: Stack = stack["settings"]
    output = f"s3://{settings.bucket}/runs/champion-check"
    step = subprocess.run([sys.executable, "-m", "sd_tasks", "champion", "--model-name", "dog-sdxl-lora",
                           "--output", output], cwd=REPO, capture_output=True, text=True,
                          env={**settings.base_env(), **settings.deployment_env(), "PYTHONPATH": str(REPO)})
    assert step.returncode == 0, step.stderr[-3000:]
    assert json.loads(step.stdout.splitlines()[-1]) == {"checkpoint": output, "version": 1}
    s3 = s3_client(settings)
    fetched = s3.get_object(Bucket=settings.bucket, Key="runs/champion-check/pytorch_lora_weights.safetensors")
    tags = dict(query(settings, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1",
                      "dog-sdxl-lora"))
    trained = s3.get_object(Bucket=settings.bucket, Key=f"runs/{DAG_ID}/{RUN_ID}/train/lr-{tags['learning_rate']}/"
                                                        f"checkpoint-{tags['step']}/pytorch_lora_weights.safetensors")
    assert fetched["Body"].read() == trained["Body"].read()


def test_no_run_state_was_written_to_local_disk(stack, dag_run):
    folder: Path = stack["folder"]
    misplaced = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts = path.relative_to(folder).parts
        top = parts[0]
        ok = (
            (len(parts) == 1 and top in CONTROL_FILES) or top in SERVICE_DATA
            or (top == "pids" and path.suffix == ".json")
            or (top == "airflow" and (path.suffix == ".log" or parts[1:] in (("airflow.cfg",), ("passwords.json",))))
            or (top == "mlflow" and (path.suffix == ".log" or (parts[1] == "tmp" and path.stat().st_size == 0)))
            or (top == "scratch" and parts[1] == "cache")
        )
        if not ok:
            misplaced.append(str(path.relative_to(folder)))
    assert not misplaced, f"run state on local disk (only S3 and PostgreSQL should hold it): {misplaced}"
    assert repo_state() == stack["repo_before"]


def test_down_stops_every_process_and_keeps_the_state(stack, dag_run):
    folder, settings = stack["folder"], stack["settings"]
    assert leftovers(folder)
    down = stack_cli(folder, "down", "--timeout", "20")
    assert down.returncode == 0, down.stderr
    assert leftovers(folder) == [] and list((folder / "pids").iterdir()) == []
    assert all(is_free(port) for port in settings.ports.values())
    assert (folder / "postgres" / "data" / "PG_VERSION").exists() and (folder / "airflow" / "airflow.cfg").exists()
    assert stack_cli(folder, "status").returncode == 3

