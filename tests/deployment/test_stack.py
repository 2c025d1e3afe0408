"""`make stack` for real: PostgreSQL, SeaweedFS, the MLflow server and Airflow's four components as processes, from
an empty folder, driven as a user would (the stack CLI, publish-dataset, Airflow's REST API v2), then torn down.

Airflow runs as in production: the scheduler schedules (every minute here), the `gpu` pool caps the GPU steps, and
the runs follow each other as `max_active_runs=1` orders them:

1. unpausing `lora_dog` makes the scheduler create the latest minute's run at once (catchup=False): the first
   run, `scheduled`, finds no model, so it trains its three learning rates, at most two at a time (the pool);
2. the run triggered through the REST API with a conf (the registry's own values: the same recipe) while the first
   runs waits for it, then finds the champion trained from the same dataset, recipe, base model and code: nothing to
   train, every later task skipped;
3. the next scheduled run, created once the triggered one ended (a queued run counts against max_active_runs),
   skips the same way; then the DAG is paused (a run the scheduler started meanwhile stops where it is).

None of these asks for a reviewer (the registry's `require_approval` is off): v1 became champion in `register`,
`approval` and `promote` were skipped and nothing waited. Then two runs ask for one (`require_approval` in their
conf, forced, one learning rate), both triggered while the DAG is paused (they wait, queued: a paused DAG's runs do
not start), so that when it is unpaused they follow each other with no scheduled run between them (a queued run
counts against max_active_runs):

4. the first waits in `approval` (task state `awaiting_input`) with v2 registered; a PATCH of its hitlDetails
   through the REST API approves it, `promote` makes v2 champion, recorded as approved by the REST user;
5. the second waits the same way with v3; a PATCH rejects it: `promote` is skipped, v2 stays champion, v3 is only
   `challenger`. The DAG is paused again as it ends.

Marked `stack`: `make test` leaves it out, `make test-stack` runs it (a few minutes on 2 cores). Nothing is mocked.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import FOUR_PROMPTS, REPO, SAMPLE
from deploy.local.bootstrap import s3_client
from deploy.local.processes import leftovers
from deploy.local.seaweedfs import free_port_pairs, is_free
from deploy.local.settings import Stack
from dreamline.deployment import run_folder
from sd_tasks.core.storage import MARKER
from stack_client import (DAG_ID, FINISHED, GPU_TASKS, MODEL, aliases, answered, at, bucket_keys, failed_task_logs,
                          most_at_once, path, query, registration, repo_state, rest_session, run_path, stack_cli,
                          version_tags, wait_until)

pytestmark = pytest.mark.stack

RUN_ID = "stack-test"  # the run triggered through the REST API
GPU_SLOTS = 2
LEARNING_RATES = [1e-3, 1e-4, 5e-4]  # three runs on two slots: two at once, then the third
RECIPE = {"learning_rates": LEARNING_RATES, "max_steps": 4, "checkpointing_steps": 2, "resolution": 64,
          "images_per_prompt": 1, "inference_steps": 2, "confirmation_inference_steps": 2,
          "evaluation_prompts": FOUR_PROMPTS,
          # The tiny random-weight evaluators cannot see a subject, so no version beats the base model or the
          # champion by the default margin: -10 lets every eligible version through (the gate itself is tested in
          # test_promotion.py and test_train_evaluate_register.py), so the first run promotes v1 and the runs
          # that ask for a reviewer have something to approve.
          "promotion_margin": -10}
# The test's subject registry: the sample dog at demo size, scheduled every minute.
SUBJECTS = {"subjects": {"dog": {"token": "sks", "class_noun": "dog", "kind": "live",
                                 "dataset": {"path": "dog", "version": "dog-v1"}, "schedule": "* * * * *",
                                 "timeout_hours": 1, "recipe": RECIPE}}}
CONF = {"subject": "dog", "dataset_version": "dog-v1", **RECIPE}  # the registry's values: the same recipe
# the tasks a run with nothing to train runs, before it ends skipped
FIRST_TASKS = {"recipe", "models_to_pin", "models", "dataset", "champion", "lineage", "anything_to_train"}
# What may hold files in the stack folder after a run: the services' own folders, the models and the registry, and
# the scratch folder's caches. Everything a run produced must be in S3 (and PostgreSQL).
SERVICE_DATA = {"postgres", "s3", "models", "registry"}
CONTROL_FILES = {".lock", "stack.json", "stack.env"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack brought up from nothing on free loopback ports, with the test's subject registry (scheduled every
    minute, schedules on) and a gpu pool of two slots. Torn down at the end whatever happened."""
    folder = tmp_path_factory.mktemp("stack")
    subjects = tmp_path_factory.mktemp("subjects") / "subjects.yaml"
    subjects.write_text(yaml.safe_dump(SUBJECTS, sort_keys=False))
    repo_before = repo_state()
    airflow, mlflow, s3, postgres = free_port_pairs(4)
    began = time.monotonic()
    up = stack_cli(folder, "up", "--airflow-port", str(airflow), "--mlflow-port", str(mlflow), "--s3-port", str(s3),
                   "--postgres-port", str(postgres), "--subjects", str(subjects), "--gpu-slots", str(GPU_SLOTS),
                   "--no-sample")
    up_seconds = time.monotonic() - began
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"folder": folder, "settings": Stack.load(folder), "up": up, "up_seconds": up_seconds,
               "repo_before": repo_before}
    finally:
        stack_cli(folder, "down", "--timeout", "20")


@pytest.fixture(scope="module")
def api(stack):
    return rest_session(stack["settings"])


@pytest.fixture(scope="module")
def runs(stack, api):
    """Publish the sample subject, unpause `lora_dog`, trigger a run through the REST API while the scheduler's
    first run trains, wait for both and for the next scheduled run, then pause the DAG (see the module's doc)."""
    settings: Stack = stack["settings"]
    env = {**settings.base_env(), **settings.deployment_env(), "PYTHONPATH": str(REPO)}
    publish = subprocess.run([sys.executable, "-m", "sd_tasks", "publish-dataset", "--source", str(SAMPLE),
                              "--repo", str(settings.registry), "--path", "dog", "--tag", "dog-v1",
                              "--remote", f"s3://{settings.bucket}/dvc"], cwd=REPO, env=env, capture_output=True,
                             text=True)
    assert publish.returncode == 0, publish.stderr[-3000:]

    def dag_runs() -> list[dict]:
        return api.get(f"{api.base}/dags/{DAG_ID}/dagRuns", params={"limit": 100, "order_by": "id"}).json()["dag_runs"]

    def finished(run_id: str) -> dict | None:
        run = api.get(f"{api.base}/dags/{DAG_ID}/dagRuns/{path(run_id)}").json()
        return run if run["state"] in FINISHED else None

    deadline = time.monotonic() + 180  # the dag-processor parses dags/ soon after it starts
    while (dag := api.get(f"{api.base}/dags/{DAG_ID}")).status_code == 404 and time.monotonic() < deadline:
        time.sleep(2)
    assert dag.status_code == 200, (dag.text, api.get(f"{api.base}/importErrors").text)
    assert dag.json()["is_paused"] and dag_runs() == []  # new DAGs start paused: no run before the data is there
    began = time.monotonic()
    assert api.patch(f"{api.base}/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    [first] = wait_until("the scheduler's first run", dag_runs, timeout=120, every=1)
    trigger = api.post(f"{api.base}/dags/{DAG_ID}/dagRuns",
                       json={"dag_run_id": RUN_ID, "logical_date": None, "conf": CONF})
    assert trigger.status_code == 200, trigger.text
    trained = wait_until(f"run {first['dag_run_id']}", lambda: finished(first["dag_run_id"]))
    trained_at = time.monotonic()
    triggered = wait_until(f"run {RUN_ID}", lambda: finished(RUN_ID))
    triggered_at = time.monotonic()

    def next_scheduled() -> dict | None:
        later = [r for r in dag_runs() if r["run_type"] == "scheduled" and r["dag_run_id"] != trained["dag_run_id"]]
        return later[0] if later and later[0]["state"] in FINISHED else None

    scheduled = wait_until("the next scheduled run", next_scheduled, every=1)
    assert api.patch(f"{api.base}/dags/{DAG_ID}", json={"is_paused": True}).status_code == 200
    # A run the scheduler started meanwhile stops where it is: its running tasks end, no other starts.
    wait_until("the paused DAG's running tasks", lambda: api.get(
        f"{api.base}/dags/{DAG_ID}/dagRuns/~/taskInstances",
        params={"state": ["queued", "running"]}).json()["total_entries"] == 0, timeout=120)
    print(f"\nstack up from nothing: {stack['up_seconds']:.0f} s; after unpausing, the first run "
          f"({trained['run_type']}) {trained['state']} in {trained_at - began:.0f} s, the triggered run "
          f"{triggered['state']} {triggered_at - trained_at:.0f} s later, the next scheduled run {scheduled['state']} "
          f"{time.monotonic() - triggered_at:.0f} s later", flush=True)

    def tasks(run: dict) -> list[dict]:
        return api.get(f"{api.base}/dags/{DAG_ID}/dagRuns/{path(run['dag_run_id'])}/taskInstances",
                       params={"limit": 200}).json()["task_instances"]

    def log(run: dict, task_id: str) -> str:
        [ti] = [t for t in tasks(run) if t["task_id"] == task_id]
        answer = api.get(f"{api.base}/dags/{DAG_ID}/dagRuns/{path(run['dag_run_id'])}/taskInstances/{task_id}/logs/"
                         f"{ti['try_number']}", headers={"Accept": "application/json"})
        assert answer.status_code == 200, answer.text
        return "\n".join(str(line.get("event", line) if isinstance(line, dict) else line)
                         for line in answer.json()["content"])

    return {"trained": {"run": trained, "tasks": tasks(trained)},
            "triggered": {"run": triggered, "tasks": tasks(triggered), "log": log(triggered, "anything_to_train")},
            "scheduled": {"run": scheduled, "tasks": tasks(scheduled), "log": log(scheduled, "anything_to_train")},
            "all": dag_runs(), "dag": api.get(f"{api.base}/dags/{DAG_ID}").json()}


@pytest.fixture(scope="module")
def dag_run(runs):
    """The run that trained: its run, run id and task instances."""
    return {**runs["trained"], "run_id": runs["trained"]["run"]["dag_run_id"]}


def test_up_prints_where_everything_is_and_a_second_up_starts_nothing(stack):
    settings: Stack = stack["settings"]
    out = stack["up"].stdout
    assert settings.airflow_url in out and settings.mlflow_url in out and settings.s3_endpoint in out
    assert f"admin / {settings.secrets['airflow_admin_password']}" in out
    assert "DAGs      lora_dog, publish_dataset" in out and f"pool gpu: {GPU_SLOTS} slots" in out
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
    status = stack_cli(stack["folder"], "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"pool gpu               {GPU_SLOTS} slots, deferred tasks counted: 0 running" in status.stdout, \
        status.stdout


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


def test_the_first_run_trained_its_learning_rates_two_at_a_time_in_the_gpu_pool(stack, dag_run):
    run, tasks = dag_run["run"], dag_run["tasks"]
    assert run["state"] == "success", failed_task_logs(stack, dag_run["run_id"], tasks)
    assert run["run_type"] == "scheduled"  # created by the scheduler on unpausing, before the triggered one
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tasks}
    assert states[("anything_to_train", -1)] == "success"
    train = [t for t in tasks if t["task_id"] == "train"]
    assert [t["state"] for t in train] == ["success"] * len(LEARNING_RATES)
    # one per GPU slot, sharing out the learning rates (each with its 2 checkpoints) and the base model (the
    # yardstick; no champion yet); the confirmation (the selected checkpoint, the base model) in one
    assert sorted(s for (task, _), s in states.items() if task == "evaluate") == ["success"] * GPU_SLOTS
    assert sorted(s for (task, _), s in states.items() if task == "confirm") == ["success"]
    assert states[("register", -1)] == "success"
    # Nothing needed a retry: concurrent steps of one run (two evaluations logging to one MLflow run) do not clash
    assert [t for t in tasks if t["try_number"] > 1] == [], failed_task_logs(stack, dag_run["run_id"], tasks)
    gpu = [t for t in tasks if t["task_id"].split(".")[-1] in GPU_TASKS]  # rung_1.train too
    assert {t["pool"] for t in gpu} == {"gpu"} and {t["pool"] for t in tasks if t not in gpu} == {"default_pool"}
    assert most_at_once(train) == GPU_SLOTS  # two learning rates at once, the third after one of them
    assert most_at_once([t for t in gpu if t["state"] == "success"]) <= GPU_SLOTS  # never more than the pool


def test_the_run_triggered_with_the_same_recipe_waited_then_had_nothing_to_train(stack, runs):
    first, run, tasks = runs["trained"]["run"], runs["triggered"]["run"], runs["triggered"]["tasks"]
    assert run["run_type"] == "manual" and run["conf"] == CONF
    assert at(run["start_date"]) >= at(first["end_date"])  # max_active_runs=1: queued while the first ran
    skipped_after_lineage(stack, run, tasks, runs["triggered"]["log"])


def test_the_next_scheduled_run_with_nothing_changed_is_skipped(stack, runs):
    first, triggered, run = runs["trained"]["run"], runs["triggered"]["run"], runs["scheduled"]["run"]
    assert run["run_type"] == "scheduled" and at(run["queued_at"]) >= at(first["end_date"])  # after the champion
    assert at(run["queued_at"]) >= at(triggered["end_date"])  # the queued triggered run held it back
    skipped_after_lineage(stack, run, runs["scheduled"]["tasks"], runs["scheduled"]["log"])


def skipped_after_lineage(stack, run: dict, tasks: list[dict], log: str) -> None:
    """A run that found nothing changed: success, its first tasks ran, every later one was skipped, and the
    short-circuit said why."""
    assert run["state"] == "success", failed_task_logs(stack, run["dag_run_id"], tasks)
    states = {t["task_id"]: t["state"] for t in tasks}
    assert {states[t] for t in FIRST_TASKS} == {"success"}
    assert {s for t, s in states.items() if t not in FIRST_TASKS} == {"skipped"} and states["train"] == "skipped"
    assert "nothing to train: nothing changed since v1 (champion) was trained" in log, log[-3000:]


def test_airflow_ran_on_postgres_and_the_paused_dag_starts_no_more_runs(stack, runs):
    rows = query(stack["settings"], "airflow", "SELECT run_id, run_type, state FROM dag_run WHERE dag_id = %s "
                                               "ORDER BY id", DAG_ID)
    expected = [(r["run"]["dag_run_id"], r["run"]["run_type"], "success")
                for r in (runs["trained"], runs["triggered"], runs["scheduled"])]
    assert rows[:3] == expected
    # At most one more: the scheduled run the scheduler started as the last one ended, stopped by the pause.
    assert len(rows) <= 4 and all(kind == "scheduled" and state in ("queued", "running") for _, kind, state in rows[3:])
    assert runs["dag"]["is_paused"]
    time.sleep(5)  # a scheduler loop or two: a paused DAG gets no new run
    assert len(query(stack["settings"], "airflow", "SELECT run_id FROM dag_run WHERE dag_id = %s", DAG_ID)) == len(rows)


def test_every_artifact_of_the_run_is_in_s3(stack, dag_run):
    settings: Stack = stack["settings"]
    run = f"runs/{DAG_ID}/{run_folder(dag_run['run_id'])}/"
    keys = [k.removeprefix(run) for k in bucket_keys(settings, run)]
    images = sorted(p.name for p in SAMPLE.iterdir())
    assert sorted(k for k in keys if k.startswith("dataset/")) == [f"dataset/{MARKER}", "dataset/dataset.json",
                                                                   *[f"dataset/images/{n}" for n in images]]
    for folder in ("validated", "captions", "resized", "select", "register"):  # each one whole
        assert f"{folder}/{MARKER}" in keys, f"no whole {folder}/ in s3://{settings.bucket}/{run}"
    checkpoints = {k.split("/")[1] + "/" + k.split("/")[2] for k in keys if k.startswith("train/")}
    assert checkpoints == {f"lr-{lr:g}/checkpoint-{step}" for lr in LEARNING_RATES for step in (2, 4)}
    for checkpoint in checkpoints:
        assert any(k.startswith(f"train/{checkpoint}/") and k.endswith(".safetensors") for k in keys), checkpoint
        assert f"train/{checkpoint}/{MARKER}" in keys, checkpoint
    evaluations = {"/".join(k.split("/")[1:3]) for k in keys if k.startswith("eval/lr-")}
    assert evaluations == {f"lr-{lr:g}/step-{step}" for lr in LEARNING_RATES for step in (2, 4)}
    for folder in ("eval/base", "confirm/challenger", "confirm/base"):  # the yardstick, the confirmation suite
        assert f"{folder}/{MARKER}" in keys, f"no whole {folder}/ in s3://{settings.bucket}/{run}"
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
        Bucket=settings.bucket, Key=f"runs/{DAG_ID}/{run_folder(dag_run['run_id'])}/dataset/dataset.json")["Body"].read())
    assert tags["dataset.rev"] == "dog-v1" and tags["dataset.hash"] == dataset["hash"]
    assert tags["dataset.hash"].startswith("sha256:") and tags["dataset.commit"] == dataset["commit"]
    code = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["code_version"] == code
    assert float(tags["learning_rate"]) in LEARNING_RATES and tags["step"] in ("2", "4")


def test_mlflow_artifacts_went_through_the_server_to_s3(stack, dag_run):
    settings: Stack = stack["settings"]
    [(location,)] = query(settings, "mlflow", "SELECT artifact_location FROM experiments WHERE name = 'dog'")
    run_ids = [r for (r,) in query(settings, "mlflow", "SELECT run_uuid FROM runs JOIN experiments e USING "
                                                        "(experiment_id) WHERE e.name = 'dog'")]
    assert location.startswith("mlflow-artifacts:/"), location  # proxied: clients never see S3
    keys = bucket_keys(settings, "mlflow/")
    assert any(k.endswith("report.md") for k in keys) and any(k.endswith(".png") for k in keys)
    assert any(k.endswith(".safetensors") and "/models/" in k for k in keys)  # the registered LoRA
    # parent + one per learning rate, of the run that trained: the skipped runs opened none
    assert len(run_ids) == 1 + len(LEARNING_RATES) and {k.split("/")[2] for k in keys} >= set(run_ids)


def test_tomorrows_run_fetches_the_champion_from_the_mlflow_server(stack, dag_run):
    """The `champion` step as the next run would run it: the registered LoRA downloaded through the server (the
    download is not left in the step's temp folder: the next test looks), written to S3, the registered bytes."""
    settings: Stack = stack["settings"]
    output = f"s3://{settings.bucket}/runs/champion-check"
    step = subprocess.run([sys.executable, "-m", "sd_tasks", "champion", "--model-name", "dog-sdxl-lora",
                           "--output", output], cwd=REPO, capture_output=True, text=True,
                          env={**settings.base_env(), **settings.deployment_env(), "PYTHONPATH": str(REPO)})
    assert step.returncode == 0, step.stderr[-3000:]
    assert json.loads(step.stdout.splitlines()[-1]) == {"checkpoint": output, "version": 1, "instance": "sks dog"}
    s3 = s3_client(settings)
    fetched = s3.get_object(Bucket=settings.bucket, Key="runs/champion-check/pytorch_lora_weights.safetensors")
    tags = dict(query(settings, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1",
                      "dog-sdxl-lora"))
    trained = s3.get_object(Bucket=settings.bucket, Key=f"runs/{DAG_ID}/{run_folder(dag_run['run_id'])}/train/"
                                                        f"lr-{float(tags['learning_rate']):g}/checkpoint-{tags['step']}/"
                                                        "pytorch_lora_weights.safetensors")
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


# A run that asks for a reviewer: forced (nothing changed), one learning rate (the shortest sweep)
REVIEWED_CONF = {**CONF, "force": True, "require_approval": True, "learning_rates": [1e-3]}
APPROVED_RUN, REJECTED_RUN = "review-approve", "review-reject"


@pytest.fixture(scope="module")
def reviewed(stack, api, runs):
    """Two runs that ask for a reviewer, answered through the REST API: the first approved, the second rejected
    (see the module's doc)."""
    assert api.get(f"{api.base}/dags/{DAG_ID}").json()["is_paused"]  # as `runs` left it
    # Triggered while paused, so both wait queued, and while one is queued the scheduler creates no run. Queued
    # runs start in run_after order: one millisecond apart past a whole second, no minute of the schedule falls
    # between them, so a scheduled run created on unpausing, if any, goes before both (nothing changed since v1:
    # it skips) or after both (stopped by the pause at the end).
    second = datetime.now(timezone.utc).replace(microsecond=0)
    for n, run_id in enumerate((APPROVED_RUN, REJECTED_RUN), start=1):
        trigger = api.post(f"{api.base}/dags/{DAG_ID}/dagRuns", json={
            "dag_run_id": run_id, "logical_date": None, "run_after": (second + timedelta(milliseconds=n)).isoformat(),
            "conf": REVIEWED_CONF})
        assert trigger.status_code == 200, trigger.text
    assert api.patch(f"{api.base}/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    began = time.monotonic()
    try:
        answers = {run_id: answered(stack, api, run_id, option)
                   for run_id, option in ((APPROVED_RUN, "Approve"), (REJECTED_RUN, "Reject"))}
    finally:  # paused again at once: the scheduled run that follows (the registry's recipe) stops where it is
        api.patch(f"{api.base}/dags/{DAG_ID}", json={"is_paused": True})
    wait_until("the paused DAG's running tasks", lambda: api.get(
        f"{api.base}/dags/{DAG_ID}/dagRuns/~/taskInstances",
        params={"state": ["queued", "running"]}).json()["total_entries"] == 0, timeout=120)
    print("\nafter unpausing for the reviewed runs: " + "; ".join(
        f"{run_id} asked at {a['asked_at'] - began:.0f} s, ended {a['run']['state']} at {a['ended_at'] - began:.0f} s"
        for run_id, a in answers.items()), flush=True)
    return answers


def test_without_a_reviewer_register_promoted_and_nothing_waited(stack, api, dag_run):
    run_id, settings = dag_run["run_id"], stack["settings"]
    states = {t["task_id"]: t["state"] for t in dag_run["tasks"]}
    assert (states["register"], states["approval_needed"], states["close_mlflow_run"]) == ("success",) * 3
    assert (states["approval"], states["promote"]) == ("skipped", "skipped")
    [approval] = [t for t in dag_run["tasks"] if t["task_id"] == "approval"]
    assert approval["start_date"] == approval["end_date"]  # skipped at once: it never ran, so never waited
    asked = api.get(f"{api.base}{run_path(run_id)}/taskInstances/approval/-1/hitlDetails")
    assert asked.status_code == 404, asked.text  # no approval was ever asked for
    result = registration(stack, run_id)
    assert (result["version"], result["promoted"], result["awaiting_approval"], result["champion"]) == \
        (1, True, False, 1)
    tags = version_tags(settings, 1)
    assert (tags["champion.action"], tags["champion.by"], tags["champion.previous"]) == ("promoted", "dreamline",
                                                                                         "none")


def test_an_approval_through_the_rest_api_makes_the_version_champion(stack, api, reviewed):
    settings: Stack = stack["settings"]
    approved = reviewed[APPROVED_RUN]
    run, tasks = approved["run"], approved["tasks"]
    assert run["state"] == "success" and run["conf"] == REVIEWED_CONF, failed_task_logs(stack, APPROVED_RUN, tasks)
    result = registration(stack, APPROVED_RUN)
    assert (result["version"], result["promoted"], result["awaiting_approval"]) == (2, False, True)
    asked = approved["asked"]  # what the reviewer was shown: the decision, its interval, the grids
    assert asked["subject"] == "Promote dog-sdxl-lora v2 to champion?" and asked["defaults"] == ["Reject"]
    assert result["decision"] in asked["body"] and "interval" in asked["body"], asked["body"][:3000]
    assert "against champion v1" in asked["body"] and "get-artifact?path=review/grid-prompt-00.png" in asked["body"]
    assert approved["aliases_while_waiting"] == [("challenger", 2), ("champion", 1)]  # nothing moved unanswered
    reviewer = approved["answer"]["responded_by"]["name"]
    assert reviewer == "admin" and approved["again"] == 409  # answered once, by the REST user
    assert approved["answered"]["response_received"] and approved["answered"]["chosen_options"] == ["Approve"]
    states = {t["task_id"]: t["state"] for t in tasks}
    assert (states["approval"], states["promote"], states["close_mlflow_run"]) == ("success",) * 3
    assert approved["aliases"] == [("challenger", 2), ("champion", 2)]
    tags = version_tags(settings, 2)
    assert (tags["champion.action"], tags["champion.by"], tags["champion.previous"]) == ("approved", reviewer, "1")
    assert tags["champion.reason"] == result["decision"]
    [(description,)] = query(settings, "mlflow", "SELECT description FROM registered_models WHERE name = %s", MODEL)
    history = description.split("## Champion history\n", 1)[1].splitlines()
    assert [line.split(": ", 1)[1].split(":", 1)[0] for line in history] == [
        "none -> v1, promoted by dreamline", f"v1 -> v2, approved by {reviewer}"], description


def test_a_rejection_through_the_rest_api_keeps_the_champion(stack, api, reviewed):
    settings: Stack = stack["settings"]
    rejected, approved = reviewed[REJECTED_RUN], reviewed[APPROVED_RUN]
    run, tasks = rejected["run"], rejected["tasks"]
    assert run["state"] == "success", failed_task_logs(stack, REJECTED_RUN, tasks)
    assert at(run["start_date"]) >= at(approved["run"]["end_date"])  # queued behind the first (max_active_runs)
    result = registration(stack, REJECTED_RUN)
    assert (result["version"], result["awaiting_approval"], result["champion"]) == (3, True, 2)
    assert rejected["asked"]["subject"] == "Promote dog-sdxl-lora v3 to champion?"
    assert "against champion v2" in rejected["asked"]["body"]
    assert rejected["answered"]["chosen_options"] == ["Reject"] and rejected["again"] == 409
    states = {t["task_id"]: t["state"] for t in tasks}
    assert (states["approval"], states["promote"], states["close_mlflow_run"]) == ("success", "skipped", "success")
    assert rejected["aliases"] == aliases(settings) == [("challenger", 3), ("champion", 2)]
    assert not [k for k in version_tags(settings, 3) if k.startswith("champion.")]
    assert version_tags(settings, 2)["champion.action"] == "approved"  # its record untouched


def test_down_stops_every_process_and_keeps_the_state(stack, dag_run):
    folder, settings = stack["folder"], stack["settings"]
    assert leftovers(folder)
    down = stack_cli(folder, "down", "--timeout", "20")
    assert down.returncode == 0, down.stderr
    assert leftovers(folder) == [] and list((folder / "pids").iterdir()) == []
    assert all(is_free(port) for port in settings.ports.values())
    assert (folder / "postgres" / "data" / "PG_VERSION").exists() and (folder / "airflow" / "airflow.cfg").exists()
    assert stack_cli(folder, "status").returncode == 3

