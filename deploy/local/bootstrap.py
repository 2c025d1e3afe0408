"""What the DAGs need besides the services: the S3 bucket, the offline tiny models, the data registry and Airflow's
`gpu` pool; and the subjects (DAGs) of the stack's subject registry.

Each is done once and is skipped when already there. The models and the dataset are made by the project's own
step CLI (`python -m sd_tasks tiny-model`, `publish-dataset`) with the steps' environment, so they come out as a
user's would: the registry is a Git repo in the stack folder (registry/repo) whose DVC remote is s3://<bucket>/dvc.
The pool is made as an operator would, with `airflow pools set`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deploy.local import models
from deploy.local.processes import StackError
from deploy.local.settings import REPO, SAMPLE_SUBJECT, Stack

SAMPLE_PATH, SAMPLE_TAG = "dog", "dog-v1"
GPU_POOL = "gpu"  # the pool of the DAGs' GPU steps (plugins/dreamline/profiles.py)


def s3_client(stack: Stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.secrets["s3_access_key"],
                        aws_secret_access_key=stack.secrets["s3_secret_key"], region_name="us-east-1")


def ensure_bucket(stack: Stack) -> None:
    import botocore.exceptions

    client = s3_client(stack)
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if stack.bucket not in names:
            client.create_bucket(Bucket=stack.bucket)
    except botocore.exceptions.ClientError as exc:
        raise StackError(f"s3: cannot create bucket {stack.bucket!r} with the stack's keys "
                         f"({exc.response['Error'].get('Code')}); see {stack.path('s3', 'weed.log')}") from None


def ensure_models(stack: Stack) -> None:
    """The tiny models, built where the stack's tiny defaults point if missing; or the hub models the stack was
    given, fetched into the model cache and pinned now (deploy/local/models.py), so a first run does not download."""
    chosen, folder = stack.model_settings(), stack.path("models")
    env = {**stack.base_env(), **stack.deployment_env(), "PYTHONPATH": str(REPO)}
    try:
        models.prepare(chosen, folder, env, stack.path("scratch"))
    except (ValueError, RuntimeError) as exc:
        raise StackError(f"models: {exc}") from None


def has_version(stack: Stack, tag: str) -> bool:
    registry = stack.registry
    if not (registry / ".git").exists():
        return False
    proc = subprocess.run(["git", "tag", "--list", tag], cwd=registry, capture_output=True, text=True)
    return proc.stdout.strip() == tag


def publish_sample(stack: Stack) -> None:
    """The shipped sample subject as version dog-v1 of the registry, its files on the S3 remote."""
    if has_version(stack, SAMPLE_TAG):
        return
    _step(stack, "publish-dataset", ["--source", str(SAMPLE_SUBJECT), "--repo", str(stack.registry),
                                     "--path", SAMPLE_PATH, "--tag", SAMPLE_TAG, "--remote", f"s3://{stack.bucket}/dvc"],
          stack.path("registry", "publish.log"))


def ensure_pool(stack: Stack) -> None:
    """Airflow's `gpu` pool with the stack's slots, deferred tasks counted (a deferred pod still holds its GPU);
    without it the scheduler never runs a GPU step. `pools set` creates it or updates its size."""
    log = stack.path("airflow", "pools.log")
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "airflow", "pools", "set", GPU_POOL, str(stack.gpu_slots),
                               "GPU slots", "--include-deferred"], env=stack.airflow_process_env(),
                              cwd=stack.path("airflow"), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise StackError(f"airflow pools set {GPU_POOL} failed with status {proc.returncode}; see {log}")


def subject_names(source: str | None) -> list[str] | None:
    """The subjects of a subject registry file (None: the repo's dags/subjects.yaml), read as the DAGs read it;
    None for a registry in an Airflow Variable. A registry that cannot be read raises ValueError naming why."""
    if source and source.startswith("variable:"):
        return None
    plugins = str(REPO / "plugins")
    if plugins not in sys.path:
        sys.path.append(plugins)
    from dreamline import subjects  # plain Python and YAML: no Airflow import

    return [subject.name for subject in subjects.load(source or str(subjects.DEFAULT_REGISTRY))]


def _step(stack: Stack, step: str, args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "sd_tasks", step, *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**stack.base_env(), **stack.deployment_env(), "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
        raise StackError(f"{step} failed ({errors[-1] if errors else f'status {proc.returncode}'}); see {log}")
