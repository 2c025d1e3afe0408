"""A real S3 server for tests: SeaweedFS (`weed mini`, launched as deploy/local/seaweedfs.py says) on 127.0.0.1 only.

    with seaweedfs(tmp_dir) as endpoint:      # "http://127.0.0.1:<port>"
        boto3.client("s3", endpoint_url=endpoint, ...).create_bucket(Bucket="dreamline")

Every component listens on a free loopback port (two test sessions never collide, and nothing is bound to 0.0.0.0),
telemetry is off, and all state, sockets included, stays under the given folder. No identities are configured, so
any access key is accepted and tests use dummy credentials (the stack's server, deploy/local, enforces its keys).
"""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

from deploy.local.seaweedfs import COMPONENTS, HOST, free_port_pairs, free_ports, mini_argv, mini_env, s3_answers

__all__ = ["seaweedfs", "free_ports"]


@contextlib.contextmanager
def seaweedfs(folder: Path, timeout: float = 60.0) -> Iterator[str]:
    """Run `weed mini` with its data in `folder`; yield the S3 endpoint URL once it answers; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS))))
    endpoint = f"http://{HOST}:{ports['s3']}"
    log_path = folder / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(mini_argv(folder, ports), cwd=folder, env=mini_env(folder), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _wait_until_up(endpoint, proc, log_path, timeout)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_up(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (reason := s3_answers(endpoint)) is not None:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini: {reason} after {timeout:.0f} s:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)
