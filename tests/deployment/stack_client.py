"""Talking to a running `make stack` as a user would, and reading what it holds: the stack CLI, Airflow's REST API v2,
its logs, the S3 bucket and the PostgreSQL databases. Shared by tests/deployment/test_stack.py and the reliability
suite's full stack (tests/reliability/full_stack.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import REPO
from deploy.local.bootstrap import s3_client
from deploy.local.settings import Stack
from dreamline.deployment import run_folder

DAG_ID = "lora_dog"
RUN_TIMEOUT = 900  # seconds; the training run takes 2 to 4 minutes on 2 cores, a skipped one under one
FINISHED = ("success", "failed")
GPU_TASKS = ("encode", "class_images", "encode_class_images", "train", "evaluate", "confirm")  # the gpu profile's
MODEL = "dog-sdxl-lora"


def stack_cli(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.local.stack", "--folder", str(folder), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def repo_state() -> set[str]:
    """The repo's changed, untracked and ignored paths, but for bytecode and pytest's own cache."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


def rest_session(settings: Stack):
    """A REST API v2 session logged in as the stack's admin."""
    import requests

    session = requests.Session()
    session.trust_env = False  # loopback only, never a proxy
    token = session.post(f"{settings.airflow_url}/auth/token", timeout=30,
                         json={"username": "admin", "password": settings.secrets["airflow_admin_password"]})
    assert token.status_code in (200, 201), token.text
    session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    session.base = f"{settings.airflow_url}/api/v2"
    return session


def wait_until(what: str, check, timeout: float = RUN_TIMEOUT, every: float = 2.0):
    """check()'s first true value, asked every `every` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(every)
    return result


def path(run_id: str) -> str:
    return quote(run_id, safe="")


def at(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def most_at_once(tasks: list[dict]) -> int:
    """The most task instances that were running at the same moment, from their start and end dates."""
    edges = sorted([(at(t["start_date"]), 1) for t in tasks] + [(at(t["end_date"]), -1) for t in tasks])
    running = peak = 0
    for _, change in edges:  # at the same instant an end (-1) sorts before a start (+1)
        running += change
        peak = max(peak, running)
    return peak


def failed_task_logs(stack, run_id: str, tasks: list[dict]) -> str:
    """The end of each failed or retried task's log, read where the components wrote them."""
    logs = stack["folder"] / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
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


def run_path(run_id: str) -> str:
    return f"/dags/{DAG_ID}/dagRuns/{path(run_id)}"


def run_tasks(api, run_id: str) -> list[dict]:
    return api.get(f"{api.base}{run_path(run_id)}/taskInstances", params={"limit": 200}).json()["task_instances"]


def registration(stack, run_id: str) -> dict:
    """register's result, as the step wrote it to the run's folder."""
    settings: Stack = stack["settings"]
    key = f"runs/{DAG_ID}/{run_folder(run_id)}/register/registration.json"
    return json.loads(s3_client(settings).get_object(Bucket=settings.bucket, Key=key)["Body"].read())


def aliases(settings: Stack) -> list[tuple]:
    return sorted(query(settings, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                        MODEL))


def version_tags(settings: Stack, version: int) -> dict[str, str]:
    return dict(query(settings, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND "
                                          "version = %s", MODEL, version))


def parked(stack, run_id: str) -> bool:
    """Whether the scheduler has taken in the end of the process that parked run `run_id`'s approval task.

    A reviewer answers later than that; answering sooner trips Airflow 3.3.2: the answer puts the task back to
    scheduled, the scheduler queues it again under the same try number, then reads the parking process's `success`
    event, finds the task queued, and fails it as changed externally. No REST field changes when the scheduler reads
    that event, so its own log says when it has."""
    log = (stack["folder"] / "airflow" / "scheduler.log").read_text(errors="replace")
    finished = f"TaskInstance Finished: dag_id={DAG_ID}, task_id=approval, run_id={run_id},"
    return any(finished in line and "state=awaiting_input" in line for line in log.splitlines())


def answered(stack, api, run_id: str, option: str) -> dict:
    """Wait until run `run_id` asks for a reviewer (its `approval` task in state awaiting_input), read what it asks
    and the registry's aliases, answer `option` through the REST API (and try a second answer), wait for the run."""
    def waiting() -> bool:
        run = api.get(f"{api.base}{run_path(run_id)}").json()
        if run["state"] in FINISHED:  # it should wait for an answer, not end
            tasks = run_tasks(api, run_id)
            pytest.fail(f"run {run_id} {run['state']} without asking: { {t['task_id']: t['state'] for t in tasks} }"
                        f"\n{failed_task_logs(stack, run_id, tasks)}")
        return api.get(f"{api.base}{run_path(run_id)}/taskInstances/approval").json().get("state") == "awaiting_input"

    wait_until(f"run {run_id}'s approval", waiting)
    wait_until(f"the scheduler's record of run {run_id}'s approval parked", lambda: parked(stack, run_id), timeout=60,
               every=0.5)
    asked_at = time.monotonic()
    hitl = f"{api.base}{run_path(run_id)}/taskInstances/approval/-1/hitlDetails"
    asked = api.get(hitl)
    assert asked.status_code == 200, asked.text
    while_waiting = aliases(stack["settings"])
    answer = api.patch(hitl, json={"chosen_options": [option], "params_input": {}})
    assert answer.status_code == 200, answer.text
    again = api.patch(hitl, json={"chosen_options": ["Approve"], "params_input": {}})
    run = wait_until(f"run {run_id}", lambda: (r := api.get(f"{api.base}{run_path(run_id)}").json())[
        "state"] in FINISHED and r)
    return {"asked": asked.json(), "aliases_while_waiting": while_waiting, "answer": answer.json(),
            "again": again.status_code, "answered": api.get(hitl).json(), "run": run, "tasks": run_tasks(api, run_id),
            "aliases": aliases(stack["settings"]), "asked_at": asked_at, "ended_at": time.monotonic()}
