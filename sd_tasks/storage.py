"""Step inputs and outputs are URIs: a local path or any fsspec URL (s3://bucket/key with s3fs installed).

Steps work on local directories. `read_dir` gives a local view of an input (remote inputs are downloaded once to
a cache), `write_dir` gives a local staging directory that becomes the output only when the step succeeds, so a
killed step never leaves a half-written output behind that a rerun could mistake for a whole one.

S3 is configured by the environment, the standard AWS way (checked with s3fs 2026.9, botocore 1.43, dvc-s3 3.3):
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a role), and for an S3-compatible store (MinIO, SeaweedFS, Ceph)
AWS_ENDPOINT_URL_S3=http://host:port. That one variable serves s3:// step URIs here, DVC's S3 remotes (the data
registry) and boto3 alike. AWS_ENDPOINT_URL (all AWS services) and FSSPEC_S3_ENDPOINT_URL (fsspec only) also work
for step URIs. MLflow's artifact client reads its own MLFLOW_S3_ENDPOINT_URL. A remote input is cached under
SD_TASKS_CACHE (default: <tmp>/sd_tasks-cache) by its URI, so a run folder's outputs are written once, not replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec

from sd_tasks.errors import StepError


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _local(uri: str) -> Path:
    return Path(str(uri).removeprefix("file://")).expanduser()


def read_dir(uri: str) -> Path:
    """A local directory holding the contents of `uri`."""
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_dir():
            raise StepError(f"{uri}: no such directory")
        return path
    cache = Path(os.environ.get("SD_TASKS_CACHE", Path(tempfile.gettempdir()) / "sd_tasks-cache"))
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not target.exists():
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isdir(path):
            raise StepError(f"{uri}: no such directory")
        staging = Path(tempfile.mkdtemp(dir=cache.mkdir(parents=True, exist_ok=True) or cache))
        fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
        try:
            staging.rename(target)
        except OSError:  # a concurrent step (the mapped train tasks, say) fetched the same URI first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():
                raise
    return target


@contextlib.contextmanager
def write_dir(uri: str) -> Iterator[Path]:
    """Stage an output directory locally; publish it to `uri` (replacing what was there) only on success."""
    if not is_remote(uri):
        final = _local(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix="sd_tasks-out-"))
    staging.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield staging
        for path in staging.rglob("*"):  # some writers (safetensors) create files private to their user
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        if is_remote(uri):
            fs, path = fsspec.core.url_to_fs(uri)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(str(staging).rstrip("/") + "/", path, recursive=True)
        else:
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(uri: str) -> dict:
    try:
        with fsspec.open(str(uri).removeprefix("file://") if not is_remote(uri) else uri, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StepError(f"{uri}: no such file") from None
    except json.JSONDecodeError as exc:
        raise StepError(f"{uri}: not valid JSON ({exc})") from None


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return _local(uri).exists()
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def write_file(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part (a rename locally; a
    single PUT on object stores)."""
    if is_remote(uri):
        with fsspec.open(uri, "wb") as f:
            f.write(data)
        return
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def list_dir(uri: str) -> list[str]:
    """Names in a folder; an empty list when it does not exist."""
    if not is_remote(uri):
        path = _local(uri)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    fs, path = fsspec.core.url_to_fs(uri)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.exists(path) else []


def remove(uri: str) -> None:
    if not is_remote(uri):
        shutil.rmtree(_local(uri), ignore_errors=True)
        return
    fs, path = fsspec.core.url_to_fs(uri)
    fs.rm(path, recursive=True)


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])
