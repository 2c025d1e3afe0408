"""S3 for real: a DVC data registry on an S3 remote and s3:// step outputs, against SeaweedFS started by the test.

Endpoint and credentials come the standard way: AWS_ENDPOINT_URL_S3 (honoured by DVC's S3 remotes, s3fs and boto3)
and dummy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; or, for a registry, `endpointurl` in its committed DVC config.
Everything stays on 127.0.0.1.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE, tree_snapshot
from s3server import free_ports, seaweedfs
from sd_tasks.core import storage
from sd_tasks.core.errors import IncompleteFolder, StepError, Unavailable
from sd_tasks.data import dataset

BUCKET = "dreamline"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """A boto3 client on the test server, with the environment every S3 user here reads."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dreamline-test")  # dummies: the server accepts any key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dreamline-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("SD_TASKS_CACHE", str(tmp_path / "sd_tasks-cache"))
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    _clear_fsspec_instances()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
    yield client
    _clear_fsspec_instances()


def _clear_fsspec_instances():
    """fsspec caches filesystems by their arguments, not the environment they were made in."""
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=cwd, check=True,
                   capture_output=True)


def dvc(cwd, *args):
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)


def test_registry_on_s3_publish_and_fetch_by_tag_to_local_and_s3(s3, tmp_path):
    registry = tmp_path / "registry"
    published = dataset.publish(dataset.PublishConfig(source=str(SAMPLE), repo=str(registry), path="dog",
                                                      tag="dog-v1", remote=f"s3://{BUCKET}/dvcstore"))
    assert published["hash"] == dataset.content_hash(SAMPLE)
    stored = keys(s3, "dvcstore/")
    assert len([k for k in stored if not k.endswith(".dir")]) == 5  # the five images, content-addressed

    # A consumer has only Git and the remote: a fresh clone, and the publisher's DVC cache gone.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(registry), str(clone))
    shutil.rmtree(registry / ".dvc" / "cache")
    assert not (clone / ".dvc" / "cache").exists()

    local = dataset.run(dataset.DatasetConfig(repo=str(clone), path="dog", rev="dog-v1", output=str(tmp_path / "ds")))
    assert local["commit"] == published["commit"] and local["hash"] == published["hash"]
    assert tree_snapshot(tmp_path / "ds" / "images") == tree_snapshot(SAMPLE)

    uri = f"s3://{BUCKET}/runs/manual__1/dataset"
    remote = dataset.run(dataset.DatasetConfig(repo=str(clone), path="dog", rev="dog-v1", output=uri))
    assert remote["images"] == f"{uri}/images" and remote["hash"] == published["hash"]
    assert keys(s3, "runs/manual__1/dataset/") == [f"runs/manual__1/dataset/{storage.MARKER}",
                                                   "runs/manual__1/dataset/dataset.json"] + [
        f"runs/manual__1/dataset/images/{p.name}" for p in sorted(SAMPLE.iterdir())]
    # What landed in the bucket is byte for byte the source, read back through the steps' own storage layer.
    assert dataset.content_hash(storage.read_dir(remote["images"])) == dataset.content_hash(SAMPLE)
    assert storage.read_json(f"{uri}/dataset.json")["commit"] == published["commit"]


def test_registry_with_endpointurl_in_its_dvc_config(s3, s3_endpoint, tmp_path, monkeypatch):
    """`dvc remote modify store endpointurl ...` committed to the registry serves consumers without the env var."""
    registry = tmp_path / "registry"
    registry.mkdir()
    git(registry, "init", "-q", "-b", "main")
    dvc(registry, "init", "-q")
    dvc(registry, "remote", "add", "-d", "store", f"s3://{BUCKET}/dvcstore-config")
    dvc(registry, "remote", "modify", "store", "endpointurl", s3_endpoint)
    git(registry, "add", "-A")
    git(registry, "commit", "-qm", "registry on S3")
    # Were the config ignored, requests would go to this closed loopback port and fail, never off the machine.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")

    published = dataset.publish(dataset.PublishConfig(source=str(SAMPLE), repo=str(registry), path="dog",
                                                      tag="dog-v1"))
    assert keys(s3, "dvcstore-config/")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(registry), str(clone))
    fetched = dataset.run(dataset.DatasetConfig(repo=str(clone), path="dog", rev="dog-v1",
                                                output=str(tmp_path / "ds")))
    assert fetched["hash"] == published["hash"] == dataset.content_hash(SAMPLE)


def test_storage_round_trip_through_s3(s3, tmp_path):
    uri = f"s3://{BUCKET}/runs/manual__2/resized"
    with storage.write_dir(uri) as out:
        (out / "images").mkdir()
        for p in sorted(SAMPLE.iterdir()):
            (out / "images" / p.name).write_bytes(p.read_bytes())
        storage.write_json(out / "manifest.json", {"records": 5})
    assert keys(s3, "runs/manual__2/resized/")[1] == "runs/manual__2/resized/images/00.jpg"
    assert storage.read_json(f"{uri}/manifest.json") == {"records": 5}

    local = storage.read_dir(uri)
    assert local.is_dir() and str(local).startswith(str(tmp_path / "sd_tasks-cache"))
    assert sorted(tree_snapshot(local)) == [storage.MARKER] + [f"images/{p.name}" for p in sorted(SAMPLE.iterdir())] + [
        "manifest.json"]
    assert tree_snapshot(local / "images") == tree_snapshot(SAMPLE)

    # Writing the same URI again replaces the folder: nothing of the old output survives.
    with storage.write_dir(uri) as out:
        (out / "only.txt").write_text("new")
    assert keys(s3, "runs/manual__2/resized/") == [f"runs/manual__2/resized/{storage.MARKER}",
                                                   "runs/manual__2/resized/only.txt"]

    # A failed step leaves nothing behind.
    with pytest.raises(RuntimeError):
        with storage.write_dir(f"s3://{BUCKET}/runs/manual__2/failed") as out:
            (out / "half.txt").write_text("half")
            raise RuntimeError("step failed")
    assert keys(s3, "runs/manual__2/failed") == []

    with pytest.raises(StepError, match="no such directory"):
        storage.read_dir(f"s3://{BUCKET}/runs/does-not-exist")
    with pytest.raises(StepError, match="no such file"):
        storage.read_json(f"s3://{BUCKET}/runs/does-not-exist/report.json")


def test_step_cli_reads_and_writes_s3(s3, tmp_path):
    """validate and caption as the DAG runs them, subprocesses given only URIs and the environment."""
    images = f"s3://{BUCKET}/runs/manual__3/dataset/images"
    with storage.write_dir(images) as out:
        for p in sorted(SAMPLE.iterdir()):
            (out / p.name).write_bytes(p.read_bytes())
    run = f"s3://{BUCKET}/runs/manual__3"
    for argv in (["validate", "--input", images, "--output", f"{run}/validated"],
                 ["caption", "--report", f"{run}/validated", "--output", f"{run}/captions",
                  "--instance-prompt", "a photo of sks dog"]):
        proc = subprocess.run([sys.executable, "-m", "sd_tasks", *argv], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        json.loads(proc.stdout.splitlines()[-1])
    manifest = storage.read_json(f"{run}/captions/manifest.json")
    assert manifest["source"] == images and len(manifest["records"]) == 5
    assert {r["caption"] for r in manifest["records"]} == {"a photo of sks dog"}


# A writer that SIGKILLs itself at a chosen point of publishing a folder to S3: in the s3fs call of that phase, once
# `after` such calls have completed (at the first call's start for 0). Readers must not be fooled by what it leaves.
KILLED_WRITER = """
import os, signal, sys
import fsspec
from sd_tasks.core import storage

phase, uri, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
method = {"delete-old": "_rm", "upload": "_put_file", "marker": "_pipe_file"}[phase]
s3 = fsspec.get_filesystem_class("s3")
original, calls = getattr(s3, method), []

async def kill_after(self, *args, **kwargs):
    if phase == "marker" and not str(args[0]).endswith(storage.MARKER):  # the writer's own mark goes first
        return await original(self, *args, **kwargs)
    if after == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    result = await original(self, *args, **kwargs)
    calls.append(args)
    if len(calls) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(s3, method, kill_after)
with storage.write_dir(uri) as out:
    for i in range(30):
        (out / f"part-{i:02d}.bin").write_bytes(b"new" * 100)
"""


@pytest.mark.parametrize("phase", ["delete-old", "upload", "marker"])
def test_a_writer_killed_while_publishing_to_s3_leaves_no_folder_a_reader_takes_for_whole(s3, tmp_path, phase):
    from sd_tasks.training import train

    output = f"s3://{BUCKET}/runs/killed-{phase}/train"
    for step in (2, 4):  # checkpoint-4 is the folder being rewritten when the writer dies
        with storage.write_dir(f"{output}/checkpoint-{step}") as out:
            (out / "old.bin").write_bytes(b"old")
    uri = f"{output}/checkpoint-4"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, phase, uri, "5" if phase == "upload" else "0"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    _clear_fsspec_instances()
    left = [k.rsplit("/", 1)[1] for k in keys(s3, f"runs/killed-{phase}/train/checkpoint-4/")]
    assert left == {"delete-old": [storage.WRITING, "old.bin"],
                    "marker": [storage.WRITING, *[f"part-{i:02d}.bin" for i in range(30)]]}.get(phase, left)
    assert storage.WRITING in left  # the writer's own mark: its retry may replace the folder, nobody else's
    assert phase != "upload" or 5 <= len(left) < 30, left  # cut short part-way through the upload
    assert not storage.is_whole(uri)  # neither the old folder nor the new one, and no reader takes it for either
    with pytest.raises(IncompleteFolder, match="incomplete folder: no completion marker"):
        storage.read_dir(uri, whole=True)
    assert [c["step"] for c in train.list_checkpoints(output)] == [2]
    # The writer run again (a retried task) publishes the whole new folder.
    with storage.write_dir(uri) as out:
        (out / "new.bin").write_bytes(b"new")
    assert storage.is_whole(uri) and [c["step"] for c in train.list_checkpoints(output)] == [2, 4]
    assert keys(s3, f"runs/killed-{phase}/train/checkpoint-4/") == [
        f"runs/killed-{phase}/train/checkpoint-4/{storage.MARKER}", f"runs/killed-{phase}/train/checkpoint-4/new.bin"]


def test_an_s3_folder_no_step_wrote_is_never_replaced(s3, tmp_path):
    """A prefix holding the user's files (no completion marker, no writer's mark) is refused as an output in one
    line, and its files stay."""
    s3.put_object(Bucket=BUCKET, Key="photos/dog/00.jpg", Body=b"a photo")
    with pytest.raises(StepError, match=rf"s3://{BUCKET}/photos/dog: holds 1 files that no Dreamline step wrote"):
        with storage.write_dir(f"s3://{BUCKET}/photos/dog") as out:
            (out / "report.json").write_text("{}")
    assert keys(s3, "photos/dog/") == ["photos/dog/00.jpg"]


def test_a_folder_that_lost_a_file_is_not_whole_and_a_rewritten_one_is_fetched_again(s3, tmp_path):
    uri = f"s3://{BUCKET}/runs/manual__4/shard"
    with storage.write_dir(uri) as out:
        (out / "latents.safetensors").write_bytes(b"x" * 100)
        (out / "records.json").write_text("{}")
    first = storage.read_dir(uri, whole=True)
    s3.delete_object(Bucket=BUCKET, Key="runs/manual__4/shard/latents.safetensors")
    _clear_fsspec_instances()
    assert not storage.is_whole(uri)
    with pytest.raises(IncompleteFolder, match="incomplete folder: latents.safetensors is missing"):
        storage.read_dir(uri)  # a marked folder must match its marker, whoever reads it

    with storage.write_dir(uri) as out:  # rewritten in place: the local copy of the old one is not reused
        (out / "latents.safetensors").write_bytes(b"y" * 100)
        (out / "records.json").write_text("{}")
    second = storage.read_dir(uri, whole=True)
    assert second != first and (second / "latents.safetensors").read_bytes() == b"y" * 100
    storage.remove(uri)
    assert keys(s3, "runs/manual__4/shard/") == []

    with storage.write_dir(uri):  # an output with no files is whole too
        pass
    assert storage.is_whole(uri) and keys(s3, "runs/manual__4/shard/") == [f"runs/manual__4/shard/{storage.MARKER}"]


def test_a_fetch_cut_short_leaves_nothing_in_the_cache_and_the_next_read_is_whole(s3, tmp_path, monkeypatch):
    import s3fs
    from botocore.exceptions import EndpointConnectionError

    uri = f"s3://{BUCKET}/runs/manual__5/images"
    with storage.write_dir(uri) as out:
        for name in ("a.png", "b.png"):
            (out / name).write_bytes(name.encode() * 1000)
    fetch_file, fetched = s3fs.S3FileSystem._get_file, []

    async def connection_lost_after_one_file(self, rpath, lpath, **kwargs):
        if fetched:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1")
        fetched.append(rpath)
        return await fetch_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", connection_lost_after_one_file)
    with pytest.raises(Unavailable, match="manual__5/images: object store unreachable"):
        storage.read_dir(uri)
    cache = tmp_path / "sd_tasks-cache"
    assert list(cache.iterdir()) == [], "a half-fetched copy was left in the cache"
    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", fetch_file)
    copy = storage.read_dir(uri, whole=True)
    assert sorted(p.name for p in copy.iterdir()) == sorted([storage.MARKER, "a.png", "b.png"])


def test_a_connection_dropped_under_a_leftover_upload_task_prints_no_traceback(s3, caplog):
    """S3 killed mid-upload: aiohttp leaves a task whose write failed, and asyncio reported it with a traceback
    ("Task exception was never retrieved") after the step's own one-line error (the reliability suite saw it)."""
    from aiohttp import ClientConnectionResetError
    from fsspec.asyn import get_loop

    assert storage.list_dir(f"s3://{BUCKET}/nothing-here") == []  # fsspec's event loop at work
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for exception in (ClientConnectionResetError("Cannot write to closing transport"), ValueError("a bug")):
            get_loop().call_exception_handler({"message": "Task exception was never retrieved",
                                               "exception": exception})
    reported = [record for record in caplog.records if record.name == "asyncio"]
    assert len(reported) == 1 and "a bug" in caplog.text, "the bug is reported"
    assert "closing transport" not in caplog.text, "the dropped connection is not"


def test_a_step_reading_an_incomplete_folder_fails_in_one_line_with_an_exit_code_that_retries(s3, tmp_path):
    uri = f"s3://{BUCKET}/runs/manual__6/resized"
    with storage.write_dir(uri) as out:
        storage.write_json(out / "manifest.json", {"records": []})
        (out / "images").mkdir()
        (out / "images" / "a.png").write_bytes(b"png")
    s3.delete_object(Bucket=BUCKET, Key="runs/manual__6/resized/images/a.png")
    proc = subprocess.run([sys.executable, "-m", "sd_tasks", "encode", "--images", uri, "--output",
                           f"s3://{BUCKET}/cache/encode", "--base-model", "m"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [  # its writer's retry rewrites it: not final
        f"error: encode: {uri}: incomplete folder: images/a.png is missing"]


def test_steps_reading_the_same_uri_at_once_share_one_copy(s3, tmp_path, monkeypatch):
    """Mapped tasks (the train sweep) read the same encode cache at the same moment: the one that finishes its
    download second keeps the first one's copy instead of failing on the rename."""
    import fsspec

    uri = f"s3://{BUCKET}/runs/manual__5/resized"
    with storage.write_dir(uri) as out:
        for p in sorted(SAMPLE.iterdir()):
            (out / p.name).write_bytes(p.read_bytes())
    fs = fsspec.core.url_to_fs(uri)[0]  # the instance read_dir gets too (fsspec caches them)
    real_get = fs.get

    def get_while_another_process_reads_it(*args, **kwargs):
        # Another step process, with the same cache, reads the same URI start to finish meanwhile.
        other = subprocess.run([sys.executable, "-c", f"from sd_tasks.core import storage; storage.read_dir({uri!r})"],
                               cwd=REPO, capture_output=True, text=True)
        assert other.returncode == 0, other.stderr
        return real_get(*args, **kwargs)

    monkeypatch.setattr(fs, "get", get_while_another_process_reads_it)
    local = storage.read_dir(uri)
    assert tree_snapshot(local) == {storage.MARKER: (local / storage.MARKER).read_bytes(), **tree_snapshot(SAMPLE)}
    assert [p.name for p in (tmp_path / "sd_tasks-cache").iterdir()] == [local.name]  # no staging folder left


def test_select_and_register_read_the_metrics_not_the_images(s3, tmp_path):
    """`select` (without a review), `halve` and `register` need each evaluation's metrics.json: on S3 they read those
    and the markers, and fetch no image (a night's evaluation tree is thousands of 1024 px images)."""
    import numpy as np

    from sd_tasks.evaluation import select
    from sd_tasks.registry import register

    rng = np.random.default_rng(0)
    root = f"s3://{BUCKET}/metrics-only/eval"

    def evaluation(name: str, **fields) -> None:
        per_image = {m: rng.normal(0.5, 0.1, (2, 2)).tolist() for m in ("dino", "clip_i", "clip_t")}
        metrics = {"suite": "s", "per_image": per_image, "prompts": ["a", "b"], "champion_version": None,
                   "base": False, **{m: float(np.mean(v)) for m, v in per_image.items()}, **fields}
        with storage.write_dir(f"{root}/{name}") as out:
            (out / "images").mkdir()
            for j in range(2):
                (out / "images" / f"p{j:02d}-0.png").write_bytes(b"\x89PNG" + os.urandom(4096))
            (out / "metrics.json").write_text(json.dumps(metrics))

    evaluation("base", base=True, checkpoint=None, learning_rate=None, step=None)
    for step in (2, 4):
        evaluation(f"lr-1e-3/step-{step}", checkpoint=f"c{step}", learning_rate=1e-3, step=step, run_id=None)
    chosen = select.run(select.SelectConfig(evaluations=root, output=str(tmp_path / "select"),
                                            expected=[f"{root}/lr-1e-3"]))
    assert chosen["candidates"] == 2 and chosen["missing"] == []
    effects = json.loads((tmp_path / "select" / "selection.json").read_text())["prompt_effects"]
    assert (effects["candidates"], effects["prompts"], effects["seeds"]) == (2, 2, 2)  # measured on the sweep
    assert len(register.confirmation_evaluations(root)) == 3
    cache = tmp_path / "sd_tasks-cache"
    assert not cache.exists() or not [p for p in cache.rglob("*.png")]  # no image was fetched
