"""One full stack (tests/deployment/test_stack.py's: PostgreSQL, SeaweedFS, the MLflow server and Airflow's four components as
processes) shared by test_load.py and test_secrets.py, with ten subjects run at once and known fake credentials in
every place a step could leak them.

Ten subjects, s0..s9: s0-s4 are three-image subsets of sample_data/dog, s5-s9 the same subsets of
sample_data/backpack, so every dataset differs in content. Each subject's DAG runs once, all ten triggered through
the REST API at the same moment, on a `gpu` pool of two slots, with the tiniest recipe that still trains, evaluates,
confirms and registers (a champion each: the margin lets every version through, as in test_stack).

The credentials: the stack's own generated secrets (S3 keys, the databases' passwords, Airflow's keys), a bearer
token on the `dreamline_webhook` connection (a local receiver, promotions notified, so every register posts to
it), and a data-registry token as git's `http.extraHeader`, in the environment every step process inherits.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from conftest import FOUR_PROMPTS, REPO
from deploy.local.seaweedfs import free_port_pairs
from deploy.local.settings import Stack
from test_notify import Receiver
from stack_client import FINISHED, path, rest_session, stack_cli

SOURCES = {"dog": REPO / "sample_data" / "dog", "backpack": REPO / "sample_data" / "backpack"}
SUBSETS = [("00", "01", "02"), ("00", "01", "03"), ("00", "02", "04"), ("01", "03", "04"), ("02", "03", "04")]
SUBJECT_DATA = {f"s{n}": (noun, subset) for n, (noun, subset) in enumerate(itertools.product(SOURCES, SUBSETS))}
GPU_SLOTS = 2
RECIPE = {"learning_rates": [1e-4], "max_steps": 2, "checkpointing_steps": 2, "resolution": 64,
          "evaluation_prompts": FOUR_PROMPTS, "images_per_prompt": 1, "inference_steps": 2,
          "confirmation_inference_steps": 2, "confirmation_images_per_prompt": 1, "promotion_margin": -10}
RUN_ID = "load-test"  # the one run of each subject's DAG
RUNS_TIMEOUT = 3000  # seconds for all ten runs (25 min on 2 cores shared with other work was too few)
# Fake credentials the suite plants; the stack's own secrets are added from its stack.json.
GIT_TOKEN = "fake-registry-token-5c1e9a7f3b2d"
WEBHOOK_TOKEN = "fake-webhook-token-8d2f6b4a1e9c"
GIT_ENV = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
           "GIT_CONFIG_VALUE_0": f"Authorization: Bearer {GIT_TOKEN}"}


def dag_id(subject: str) -> str:
    return f"lora_{subject}"


def subject_registry(file: Path) -> None:
    entries = {name: {"token": "sks", "class_noun": noun, "kind": "live" if noun == "dog" else "object",
                      "dataset": {"path": name, "version": f"{name}-v1"}, "schedule": None, "timeout_hours": 1,
                      "recipe": RECIPE} for name, (noun, _) in SUBJECT_DATA.items()}
    file.write_text(yaml.safe_dump({"subjects": entries}, sort_keys=False))


def publish(settings: Stack, folder: Path) -> dict[str, dict]:
    """Each subject's images as version <name>-v1 of the stack's data registry: {name: publish-dataset's result}."""
    env = {**settings.base_env(), **settings.deployment_env(), **GIT_ENV, "PYTHONPATH": str(REPO)}
    published = {}
    for name, (noun, subset) in SUBJECT_DATA.items():
        images = folder / name
        images.mkdir(parents=True)
        for stem in subset:
            shutil.copy(SOURCES[noun] / f"{stem}.jpg", images / f"{stem}.jpg")
        step = subprocess.run([sys.executable, "-m", "sd_tasks", "publish-dataset", "--source", str(images),
                               "--repo", str(settings.registry), "--path", name, "--tag", f"{name}-v1",
                               "--remote", f"s3://{settings.bucket}/dvc"], cwd=REPO, env=env, capture_output=True,
                              text=True)
        assert step.returncode == 0, step.stderr[-3000:]
        published[name] = json.loads(step.stdout.splitlines()[-1])
    return published


def webhook_connection(api, receiver: Receiver) -> None:
    conn = {"connection_id": "dreamline_webhook", "conn_type": "http", "host": "127.0.0.1", "port": receiver.port,
            "schema": "hooks/dreamline", "password": WEBHOOK_TOKEN, "extra": json.dumps({"notify_promotions": True})}
    answer = api.post(f"{api.base}/connections", json=conn)
    assert answer.status_code == 201, answer.text


def run_all(api) -> dict:
    """Unpause and trigger the ten DAGs at once; wait for every run to end. {subject: {run, tasks}, seconds}."""
    deadline = time.monotonic() + 240  # the dag-processor parses dags/ soon after it starts
    for name in SUBJECT_DATA:
        while api.get(f"{api.base}/dags/{dag_id(name)}").status_code == 404:
            assert time.monotonic() < deadline, api.get(f"{api.base}/importErrors").text
            time.sleep(2)
    began = time.monotonic()
    for name in SUBJECT_DATA:
        assert api.patch(f"{api.base}/dags/{dag_id(name)}", json={"is_paused": False}).status_code == 200
        trigger = api.post(f"{api.base}/dags/{dag_id(name)}/dagRuns",
                           json={"dag_run_id": RUN_ID, "logical_date": None, "conf": {}})
        assert trigger.status_code == 200, trigger.text

    runs: dict = {}
    while True:  # past the deadline the runs are taken as they are: test_load says which did not end
        for name in SUBJECT_DATA:  # an answer the loaded api-server could not give (5xx, slow) is asked again
            with contextlib.suppress(requests.RequestException):
                answer = api.get(f"{api.base}/dags/{dag_id(name)}/dagRuns/{RUN_ID}", timeout=30)
                if answer.status_code == 200:
                    runs[name] = answer.json()
        finished = len(runs) == len(SUBJECT_DATA) and all(r["state"] in FINISHED for r in runs.values())
        if finished or time.monotonic() > began + RUNS_TIMEOUT:
            break
        time.sleep(5)
    seconds = time.monotonic() - began
    for name in SUBJECT_DATA:
        assert api.patch(f"{api.base}/dags/{dag_id(name)}", json={"is_paused": True}).status_code == 200
    return {"seconds": seconds, "runs": {name: {"run": run, "tasks": task_instances(api, name)}
                                         for name, run in runs.items()}}


def task_instances(api, subject: str) -> list[dict]:
    return api.get(f"{api.base}/dags/{dag_id(subject)}/dagRuns/{path(RUN_ID)}/taskInstances",
                   params={"limit": 200}).json()["task_instances"]


def bring_up(tmp_path_factory):
    """The stack with the subjects, the webhook and the credentials in place, after the ten runs; torn down after
    the session whatever happened. A generator for a session fixture."""
    folder = tmp_path_factory.mktemp("load-stack")
    work = tmp_path_factory.mktemp("load-subjects")
    subjects = work / "subjects.yaml"
    subject_registry(subjects)
    airflow, mlflow, s3, postgres = free_port_pairs(4)
    saved = {k: os.environ.get(k) for k in GIT_ENV}
    receiver = Receiver()
    try:
        os.environ.update(GIT_ENV)  # the stack's processes, and so every step they start, inherit it
        began = time.monotonic()
        up = stack_cli(folder, "up", "--airflow-port", str(airflow), "--mlflow-port", str(mlflow), "--s3-port",
                       str(s3), "--postgres-port", str(postgres), "--subjects", str(subjects), "--gpu-slots",
                       str(GPU_SLOTS), "--no-sample")
        up_seconds = time.monotonic() - began
        restore(saved)
        assert up.returncode == 0, up.stdout + up.stderr
        settings = Stack.load(folder)
        published = publish(settings, work / "images")
        api = rest_session(settings)
        webhook_connection(api, receiver)
        loaded = run_all(api)
        secrets = {f"stack {name}": value for name, value in settings.secrets.items()}
        secrets |= {"data registry token": GIT_TOKEN, "webhook token": WEBHOOK_TOKEN}
        yield {"folder": folder, "settings": settings, "api": api, "published": published, "receiver": receiver,
               "subjects_file": subjects, "up_seconds": up_seconds, "secrets": secrets, **loaded}
    finally:
        restore(saved)
        receiver.close()
        stack_cli(folder, "down", "--timeout", "20")


def restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
