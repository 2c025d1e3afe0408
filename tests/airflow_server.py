"""A real Airflow for tests that use the UI or the REST API: every component on this machine, its state in a folder.

    with airflow_server(folder, env) as server:     # env: DREAMLINE_HOME and the deployment's other variables
        server.url, server.username, server.password
        server.api("GET", "/dags/lora_dog")         # REST API v2 with a token

It runs `make ui`'s launcher (scripts/ui.py, deploy/local/embedded.py: Airflow's api-server, scheduler with the
LocalExecutor, dag-processor and triggerer on SQLite, the gpu pool, and an MLflow server over the tracking store)
with the repo's dags/ and plugins/, on free loopback ports, scheduled runs off (unpausing a DAG would otherwise
queue a run for its last interval at once). Another launcher (`airflow standalone` worked too) is a change to
`command()` and, if its login is not SimpleAuthManager's generated file, to `read_login()`: the rest waits for
HTTP answers only.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from deploy.local.seaweedfs import HOST, free_ports

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240.0  # seconds until the api-server answers and the DAG is parsed; 20 to 60 s on 2 busy cores
STOP_TIMEOUT = 60.0  # seconds from SIGTERM to SIGKILL; make ui stops its services in two phases of at most 20 s


@dataclass
class AirflowServer:
    url: str  # http://127.0.0.1:<port>, the UI and the REST API
    home: Path  # AIRFLOW_HOME
    log: Path  # what the launcher printed
    logs: Path  # the services' logs (make ui's: DREAMLINE_HOME/ui-logs)
    proc: subprocess.Popen
    username: str = ""
    password: str = ""
    _token: str = field(default="", repr=False)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        """(status, JSON body) of a REST API v2 call, e.g. api("GET", "/dags/ID"); never raises on HTTP errors."""
        if not self._token:
            status, answer = _http("POST", f"{self.url}/auth/token",
                                   {"username": self.username, "password": self.password}, timeout=timeout)
            if status not in (200, 201):
                raise RuntimeError(f"Airflow refused the login {self.username!r}: {status} {answer}")
            self._token = answer["access_token"]
        return _http(method, f"{self.url}/api/v2{path}", body, token=self._token, timeout=timeout)


def command(port: int) -> list[str]:
    """The launcher, the api-server on `port`: `make ui`'s, which stops its services on SIGTERM."""
    [mlflow_port] = free_ports(1)
    return [sys.executable, str(REPO / "scripts" / "ui.py"), "--airflow-port", str(port),
            "--mlflow-port", str(mlflow_port)]


def read_login(home: Path) -> tuple[str, str] | None:
    """SimpleAuthManager's generated admin password, once the launcher has written it."""
    generated = home / "simple_auth_manager_passwords.json.generated"
    try:
        users = json.loads(generated.read_text())
    except (OSError, ValueError):
        return None
    return next(iter(users.items()), None)


def airflow_env(folder: Path, port: int) -> dict[str, str]:
    """Airflow's configuration for a throwaway instance in `folder`, the api-server on `port`."""
    worker_logs, trigger_logs = free_ports(2)
    return {
        "AIRFLOW_HOME": str(folder),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{port}/execution/",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(worker_logs),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_logs),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # a launcher that starts its components as `airflow ...` finds the venv's
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


@contextlib.contextmanager
def airflow_server(folder: Path, env: dict[str, str], dag_id: str | None = None,
                   timeout: float = START_TIMEOUT) -> Iterator[AirflowServer]:
    """Start Airflow with its home in `folder` (created) and `env` over this process's environment; yield once the
    UI answers, the login is known and, with `dag_id`, that DAG is parsed without errors; stop it afterwards,
    services and task processes included. The launcher's own output goes to `folder`/launcher.log."""
    folder.mkdir(parents=True, exist_ok=True)
    [port] = free_ports(1)
    full_env = {**os.environ, **env, **airflow_env(folder, port)}
    log = folder / "launcher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(port), cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = AirflowServer(url=f"http://{HOST}:{port}", home=folder, log=log,
                           logs=Path(full_env["DREAMLINE_HOME"]) / "ui-logs", proc=proc)
    try:
        _wait_until_ready(server, dag_id, timeout)
        yield server
    finally:
        stop(server)


def _wait_until_ready(server: AirflowServer, dag_id: str | None, timeout: float) -> None:
    began = time.monotonic()
    deadline = began + timeout
    waiting_for = "the api-server to answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"Airflow exited with {server.proc.returncode} while waiting for {waiting_for}:\n"
                               f"{server.log_tail()}\n(the services' logs: {server.logs})")
        if not server.password:
            login = read_login(server.home)
            if login:
                server.username, server.password = login
        status, _ = _http("GET", f"{server.url}/api/v2/monitor/health", timeout=5)
        if status == 200 and server.password:
            if dag_id is None:
                return
            waiting_for = f"DAG {dag_id} to be parsed"
            status, _ = server.api("GET", f"/dags/{dag_id}")
            if status == 200:
                errors = server.api("GET", "/importErrors")[1].get("import_errors", [])
                if errors:
                    raise RuntimeError(f"DAG import errors: {errors}")
                return
        time.sleep(1)
    raise TimeoutError(f"Airflow: no answer after {timeout:.0f} s while waiting for {waiting_for}:\n"
                       f"{server.log_tail()}\n(the services' logs: {server.logs})")


def stop(server: AirflowServer) -> None:
    """SIGTERM to the launcher's whole process group (its session: the components and the executor's workers),
    each component shutting down as on Ctrl-C; SIGKILL to what is left after STOP_TIMEOUT. Task processes run in
    process groups of their own: any still alive afterwards is killed too. (Not SIGINT to the launcher alone: a
    process started from a background job ignores SIGINT.)"""
    pgid = server.proc.pid  # start_new_session: the launcher leads its own group
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        descendants = psutil.Process(pgid).children(recursive=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _group(pgid) and time.monotonic() < deadline:
            server.proc.poll()  # reap the launcher
            time.sleep(0.5)
        if not _group(pgid):
            break
    server.proc.wait(timeout=10)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):  # already gone
            proc.kill()
    psutil.wait_procs(descendants, timeout=10)


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def _http(method: str, url: str, body: dict | None = None, token: str = "",
          timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"detail": text}
    except (OSError, ValueError) as err:  # refused, reset, timed out, or not JSON yet
        return 0, {"detail": str(err)}
