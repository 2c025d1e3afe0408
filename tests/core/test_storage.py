"""Local folders: written whole or not at all, with a completion marker that every reader checks (S3: test_s3.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from sd_tasks.core import storage
from sd_tasks.core.errors import IncompleteFolder

# Killed after the marker was written into the staging folder and before the rename that publishes it.
KILLED_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
from sd_tasks.core import storage

Path.rename = lambda self, target: os.kill(os.getpid(), signal.SIGKILL)
with storage.write_dir(sys.argv[1]) as out:
    (out / "metrics.json").write_text('{"step": 4}')
"""


def test_a_local_folder_is_published_whole_with_its_marker(tmp_path):
    with storage.write_dir(str(tmp_path / "out")) as out:
        (out / "images").mkdir()
        (out / "images" / "a.png").write_bytes(b"png")
        (out / "metrics.json").write_text("{}")
    marker = json.loads((tmp_path / "out" / storage.MARKER).read_text())
    assert marker["files"] == {"images/a.png": 3, "metrics.json": 2}
    assert storage.is_whole(str(tmp_path / "out")) and storage.read_dir(str(tmp_path / "out"), whole=True)

    (tmp_path / "out" / "metrics.json").write_text('{"changed": true}')
    assert storage.why_not_whole(str(tmp_path / "out")) == "metrics.json has 17 bytes, not the 2 written"
    with pytest.raises(IncompleteFolder, match=r"out: incomplete folder: metrics.json has 17 bytes"):
        storage.read_dir(str(tmp_path / "out"))


def test_a_folder_without_a_marker_is_input_but_not_a_whole_output(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"jpg")
    assert storage.read_dir(str(tmp_path / "photos")) == tmp_path / "photos"  # a user's folder of photos
    assert not storage.is_whole(str(tmp_path / "photos"))
    with pytest.raises(IncompleteFolder, match="photos: incomplete folder: no completion marker"):
        storage.read_dir(str(tmp_path / "photos"), whole=True)


def test_a_writer_killed_before_publishing_leaves_a_staging_folder_that_readers_ignore(tmp_path):
    evaluations = tmp_path / "eval" / "lr-0.001"
    with storage.write_dir(str(evaluations / "step-2")) as out:
        (out / "metrics.json").write_text('{"step": 2}')
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(evaluations / "step-4")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    [staging] = [p for p in evaluations.iterdir() if p.name.startswith(".step-4")]
    assert (staging / storage.MARKER).exists()  # whole in itself, but never published
    assert storage.whole_folders(tmp_path / "eval") == [evaluations / "step-2"]


def test_the_next_writer_removes_a_killed_writers_staging_folder_and_keeps_a_live_ones(tmp_path):
    out = tmp_path / "eval" / "step-4"
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL
    [dead] = [p for p in out.parent.iterdir() if p.name.startswith(".step-4")]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        writing = out.parent / f".step-4{storage.STAGING}{host}-{live.pid}-abc"
        gone = subprocess.Popen(["true"])
        gone.wait()
        elsewhere = [out.parent / f".step-4{storage.STAGING}{name}-{gone.pid}-abc"
                     for name in ("other", f"{host}-{gone.pid}")]
        for folder in (writing, *elsewhere):  # at work, and another pod's (one named like ours and more)
            folder.mkdir()
        with storage.write_dir(str(out)) as staging:
            (staging / "metrics.json").write_text('{"step": 4}')
        assert not dead.exists()
        assert writing.exists() and all(folder.exists() for folder in elsewhere)
        assert storage.is_whole(str(out))
    finally:
        live.kill()
        live.wait()


def test_remove_deletes_the_marker_first(tmp_path, monkeypatch):
    with storage.write_dir(str(tmp_path / "out")) as out:
        (out / "a.bin").write_bytes(b"a")
    monkeypatch.setattr(storage.shutil, "rmtree", lambda *a, **k: None)  # a deletion cut short after the marker
    storage.remove(str(tmp_path / "out"))
    assert (tmp_path / "out" / "a.bin").exists() and not storage.is_whole(str(tmp_path / "out"))
