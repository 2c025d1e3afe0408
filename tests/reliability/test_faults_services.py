"""Faults of what the steps depend on: the MLflow server stopped mid-training, the disk filled during a checkpoint
write, S3 killed mid-upload, S3 hanging under a reader. The steps are real `python -m sd_tasks` subprocesses against
a real `mlflow server`, a real tmpfs and a real SeaweedFS; each training scenario ends with the same weights as the
clean reference run, one MLflow run, and every step's loss exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from reliability.test_faults import WALL_CLOCK, hashes, rerun, sd_tasks, train_options
from sd_tasks.core import storage, tracking
from sd_tasks.training import train
from sd_tasks.training.training_run import SPOOL

pytestmark = pytest.mark.reliability


def wait_for(condition, seconds: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05) -> float:
    """Poll until `condition()`; return the seconds it took. Fails after `seconds` or when `proc` ended first."""
    started = time.monotonic()
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the step ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - started > seconds:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(poll)
    return time.monotonic() - started


def losses_once(run_id: str, steps: int) -> None:
    history = tracking.client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "every step's loss exactly once"


def one_line_error(stderr: str, step: str = "train") -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {step}: "), stderr[-3000:]
    return last


def same_checkpoint(folder: Path, reference: Path) -> None:
    assert hashes(folder, leave_out=WALL_CLOCK) == hashes(reference, leave_out=WALL_CLOCK)


@pytest.fixture(scope="module")
def reference(cache, models, tmp_path_factory) -> Path:
    """The clean training run every scenario must end with."""
    out = tmp_path_factory.mktemp("services-ref") / "train"
    train.run(train.TrainConfig(**train_options(cache, models, out, "services-ref")))
    return out


class MlflowServer:
    """`mlflow server` on a sqlite store, started and stopped by the test (its whole process group)."""

    def __init__(self, folder: Path):
        from deploy.local.seaweedfs import free_port_pairs

        # outside the kernel's ephemeral range: the port is bound again after the outage, and an outgoing
        # connection must not take it meanwhile
        self.folder, self.port = folder, free_port_pairs(1)[0]
        self.url, self.database = f"http://127.0.0.1:{self.port}", folder / "mlflow.db"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.database}",
                "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(argv, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 120, "healthy MLflow server")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait()


def test_mlflow_server_stopped_mid_training_training_goes_on_and_every_loss_arrives_once(
        cache, models, reference, tmp_path, monkeypatch, figures):
    server = MlflowServer(tmp_path)
    server.start()
    out = tmp_path / "train"
    argv = sd_tasks("train", {**train_options(cache, models, out, "services"), "max_steps": 6})
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: storage.is_whole(str(out / "checkpoint-2")), 300, "checkpoint-2", proc)
        server.signal(signal.SIGSTOP)  # the server hangs: connections are accepted, nothing is answered
        stalled = wait_for(lambda: storage.is_whole(str(out / "checkpoint-4")), 90,
                           "checkpoint-4 while MLflow was stopped", proc)
        server.kill()  # and then it dies: the end of training finds no server at all
        proc.wait(timeout=120)
        line = one_line_error(proc.stderr.read())
        assert proc.returncode == 1 and "metrics kept in" in line and SPOOL in line, line
        assert (out / SPOOL).exists() and storage.is_whole(str(out / "checkpoint-6"))

        retried = time.monotonic()  # a retry while the server is still down: one line, in bounded time
        down = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        retried = time.monotonic() - retried
        line = one_line_error(down.stderr)
        assert down.returncode == 1 and f"MLflow at {server.url}: unreachable" in line, line
        assert (out / SPOOL).exists(), "the spool waits for the server"

        server.start()  # back: the retry sends the spooled metrics and closes the run
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (out / SPOOL).exists()
        runs = tracking.client().search_runs([tracking.experiment_id("services")])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one MLflow run, closed"
        losses_once(runs[0].info.run_id, 6)
        same_checkpoint(out / "checkpoint-4", reference / "checkpoint-4")
    finally:
        server.kill()
        if proc.poll() is None:  # a hung step (the old behaviour) must not outlive the test
            proc.kill()
    figures.record("fault", "MLflow server stopped, then killed, mid-training",
                   f"training went on ({stalled:.0f} s to the next checkpoint with the server stopped), failed in "
                   f"one line at the end and on a retry while it was down ({retried:.0f} s); the retry once it was "
                   f"back sent the spooled metrics: one run, every loss once", lost=0,
                   seconds=round(time.monotonic() - started, 1))


def test_disk_full_during_a_checkpoint_fails_in_one_line_and_the_retry_resumes_to_the_same_weights(
        cache, models, reference, tmp_path, figures):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (as here and in CI)")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in (reference / "checkpoint-2").rglob("*") if p.is_file())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 1024}k", "tmpfs", str(disk)], check=True)
    started = time.monotonic()
    try:
        out = disk / "train"
        argv = sd_tasks("train", train_options(cache, models, out, "disk-full"))
        full = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        line = one_line_error(full.stderr)
        assert full.returncode == 1, full.stderr[-2000:]
        assert f"{out}/checkpoint-4: no space left on device" in line, line
        assert [c["step"] for c in train.list_checkpoints(str(out))] == [2], "the previous checkpoint stays whole"
        same_checkpoint(out / "checkpoint-2", reference / "checkpoint-2")
        assert sorted(os.listdir(out)) == ["checkpoint-2"], "no half-written folder left behind"

        subprocess.run(["mount", "-o", f"remount,size={size * 4 // 1024}k", str(disk)], check=True)
        assert rerun(argv)["resumed_from"] == 2
        same_checkpoint(out / "checkpoint-4", reference / "checkpoint-4")
        run = tracking.client().search_runs([tracking.experiment_id("disk-full")])
        assert len(run) == 1
        losses_once(run[0].info.run_id, 4)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    figures.record("fault", "disk full during a checkpoint write",
                   "one line naming the checkpoint (exit 1), checkpoint-2 whole, the retry resumed to the same weights",
                   lost=0, seconds=round(time.monotonic() - started, 1))


class Weed:
    """SeaweedFS (`weed mini`) on fixed ports and one data folder, so it can be killed and started again."""

    def __init__(self, folder: Path):
        from deploy.local.seaweedfs import COMPONENTS, free_port_pairs

        self.folder, self.ports = folder, dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        from deploy.local.seaweedfs import mini_argv, mini_env, s3_answers

        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(mini_argv(self.folder, self.ports), cwd=self.folder, env=mini_env(self.folder),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: s3_answers(self.endpoint) is None, 120, "S3 answering")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def step_env(self, folder: Path, **extra: str) -> dict[str, str]:
        """The environment of a step using this S3 (dummy credentials: the server takes any), its cache in folder."""
        return {**os.environ, "AWS_ACCESS_KEY_ID": "dreamline-test", "AWS_SECRET_ACCESS_KEY": "dreamline-test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint, "NO_PROXY": "127.0.0.1",
                "SD_TASKS_CACHE": str(folder / "cache"), **extra}

    def bucket(self, name: str = "dreamline"):
        """A boto3 client on this S3, with the bucket `name` made."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=name)
        return s3


def test_s3_killed_while_a_checkpoint_is_published_fails_in_one_line_and_the_rerun_completes(
        cache, models, reference, tmp_path, monkeypatch, figures):
    weed = Weed(tmp_path / "weed")
    weed.start()
    staging = tmp_path / "tmp"  # the step's TMPDIR: where it stages a remote output before the upload
    staging.mkdir()
    env = weed.step_env(tmp_path, TMPDIR=str(staging))
    s3 = weed.bucket()
    out = "s3://dreamline/faults/train"
    argv = sd_tasks("train", train_options(cache, models, out, "s3-down"))
    started = time.monotonic()

    def objects(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket="dreamline", Prefix=f"faults/train/{prefix}")
                .get("Contents", [])]

    def marker(step: int) -> bool:
        return bool(objects(f"checkpoint-{step}/{storage.MARKER}"))

    proc = None
    try:
        for attempt in range(1, 9):
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            wait_for(lambda: marker(2), 300, "checkpoint-2 on S3", proc)
            wait_for(lambda: objects("checkpoint-4/"), 120, "checkpoint-4's upload", proc, poll=0)
            proc.send_signal(signal.SIGSTOP)  # held mid-upload while S3 goes: the moment cannot pass meanwhile
            if not marker(4):
                break
            proc.kill()  # its upload ended before it was held: start again from nothing
            proc.wait()
            for key in objects(""):
                s3.delete_object(Bucket="dreamline", Key=key)
        else:
            pytest.fail("checkpoint-4's upload always ended before the step could be held (8 tries)")
        uploaded = len(objects("checkpoint-4/"))
        weed.kill()
        killed = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=120)
        bounded = time.monotonic() - killed
        line = one_line_error(proc.stderr.read())
        assert proc.returncode == 1 and "checkpoint-4: object store unreachable" in line, line

        weed.start()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", weed.endpoint)
        assert not marker(4), "a checkpoint cut short by S3 is not whole"
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming from {out}/checkpoint-2" in done.stderr
        local = tmp_path / "downloaded"
        for step in (2, 4):
            prefix = f"faults/train/checkpoint-{step}/"
            for item in s3.list_objects_v2(Bucket="dreamline", Prefix=prefix)["Contents"]:
                target = local / f"checkpoint-{step}" / item["Key"].removeprefix(prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("dreamline", item["Key"], str(target))
            same_checkpoint(local / f"checkpoint-{step}", reference / f"checkpoint-{step}")
        runs = tracking.client().search_runs([tracking.experiment_id("s3-down")])
        assert len(runs) == 1
        losses_once(runs[0].info.run_id, 4)
    finally:
        weed.kill()
        if proc and proc.poll() is None:
            proc.kill()
    figures.record("fault", "S3 killed while a checkpoint was published",
                   f"killed with {uploaded} of checkpoint-4's {len(os.listdir(reference / 'checkpoint-4')) - 1} "
                   f"files uploaded, not its marker (try {attempt}): one line naming the "
                   f"checkpoint (exit 1) {bounded:.0f} s after the kill, nothing half-uploaded taken for whole, the "
                   "rerun resumed to the same weights", lost=0, seconds=round(time.monotonic() - started, 1))


# Short timeouts through fsspec's own configuration, so the scenario takes seconds. With s3fs's defaults (connect
# 5 s, read 15 s, botocore's 5 attempts, s3fs's 5 tries) the same hang ends the same way after minutes
# (docs/reliability.md).
QUICK_S3 = '{"config_kwargs": {"connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 1}}}'


def test_s3_hanging_while_a_step_reads_fails_in_one_line_in_bounded_time_and_the_retry_completes(
        prepared, tmp_path, figures):
    weed = Weed(tmp_path / "weed")
    weed.start()
    env = weed.step_env(tmp_path, FSSPEC_S3=QUICK_S3)
    s3 = weed.bucket()
    images = sorted((prepared / "dataset" / "images").iterdir())
    for image in images:
        s3.upload_file(str(image), "dreamline", f"photos/{image.name}")
    out = tmp_path / "validated"
    argv = sd_tasks("validate", {"input": "s3://dreamline/photos", "output": str(out)})
    started = time.monotonic()
    try:
        os.killpg(weed.proc.pid, signal.SIGSTOP)  # it hangs: connections are accepted, nothing is answered
        hung = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        bounded = time.monotonic() - started
        line = one_line_error(hung.stderr, "validate")
        assert hung.returncode == 1 and "s3://dreamline/photos: object store unreachable" in line, line
        assert not out.exists() and not list((tmp_path / "cache").glob("*")), "nothing written, nothing cached"

        os.killpg(weed.proc.pid, signal.SIGCONT)
        del env["FSSPEC_S3"]  # the retry with the default timeouts: S3, just continued, may be slow at first
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert storage.is_whole(str(out))
        assert json.loads(done.stdout.strip().splitlines()[-1])["accepted"] == len(images)
    finally:
        weed.kill()
    figures.record("fault", "S3 hanging (stopped) while a step read its input",
                   f"one line naming the input (exit 1) after {bounded:.0f} s with 2 s timeouts, nothing written; "
                   "the retry once it answered validated every image", lost=0,
                   seconds=round(time.monotonic() - started, 1))
