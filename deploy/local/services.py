"""The stack's services in start order, each with its command, environment, log file and health check.

    postgres               PostgreSQL (metadata of Airflow, backend store of MLflow)
    s3                     SeaweedFS `weed mini`: data, run folders, caches, the DVC remote, MLflow's artifacts
    mlflow                 `mlflow server` on PostgreSQL, artifacts proxied to s3://<bucket>/mlflow
    airflow-api-server     Airflow's REST API, UI and Execution API (LocalExecutor's tasks report to it)
    airflow-scheduler      runs tasks with LocalExecutor as local processes
    airflow-dag-processor  parses dags/ into the database
    airflow-triggerer      runs deferred tasks

A service counts as up when it answers: PostgreSQL a login, S3 a request, MLflow /health, the api-server
/api/v2/monitor/health, and the other Airflow components a heartbeat newer than their start in that same health
report. Airflow's scheduler and triggerer run without their log servers (`--skip-serve-logs`, which would bind
0.0.0.0:8793/8794): every component reads task logs from the same local folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

from deploy.local import postgres, seaweedfs
from deploy.local.processes import Service, StackError
from deploy.local.settings import HOST, Stack, write_private

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def services(stack: Stack) -> list[Service]:
    return [postgres_service(stack), s3_service(stack), mlflow_service(stack),
            *(airflow_service(stack, component) for component in AIRFLOW_COMPONENTS)]


def postgres_service(stack: Stack) -> Service:
    data, log = stack.path("postgres", "data"), stack.path("postgres", "postgres.log")
    port, password = stack.ports["postgres"], stack.secrets["postgres_password"]
    return Service(
        name="postgres", argv=postgres.server_argv(data, port), env=stack.base_env(), log=log,
        cwd=stack.path("postgres"), health=lambda: postgres.health(port, password), timeout=60,
        stop_signal=2,  # SIGINT, PostgreSQL's "fast" shutdown: SIGTERM would wait for every client to leave
        url=f"postgresql://{HOST}:{port}", before_start=lambda: postgres.initdb(data, password, log))


def s3_service(stack: Stack) -> Service:
    folder = stack.path("s3")
    identities = folder / "identities.json"
    ports = {**stack.seaweedfs_ports, "s3": stack.ports["s3"]}
    return Service(
        name="s3", argv=seaweedfs.mini_argv(folder, ports, identities=identities),
        env=seaweedfs.mini_env(folder, stack.base_env()), log=folder / "weed.log", cwd=folder,
        health=lambda: seaweedfs.s3_answers(stack.s3_endpoint), timeout=90, url=stack.s3_endpoint,
        before_start=lambda: seaweedfs.write_identities(identities, stack.secrets["s3_access_key"],
                                                        stack.secrets["s3_secret_key"]))


def mlflow_service(stack: Stack) -> Service:
    # The server alone talks to S3 for artifacts (clients upload through it). Its temp files (a lock file while
    # it sets up its tables, artifacts in transit) stay in its own folder.
    tmp = stack.path("mlflow", "tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # The database URL (it holds the password) goes by environment, not argv, which every local user can read.
    env = {**stack.base_env(), **stack.s3_env(), "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint, "TMPDIR": str(tmp),
           "MLFLOW_BACKEND_STORE_URI": stack.database_url("mlflow")}
    argv = [sys.executable, "-m", "mlflow", "server",
            "--artifacts-destination", f"s3://{stack.bucket}/mlflow", "--host", HOST,
            "--port", str(stack.ports["mlflow"]), "--workers", "2"]
    return Service(name="mlflow", argv=argv, env=env, log=stack.path("mlflow", "mlflow.log"),
                   cwd=stack.path("mlflow"), health=lambda: http_ok(f"{stack.mlflow_url}/health"), timeout=240,
                   url=stack.mlflow_url)


def airflow_service(stack: Stack, component: str) -> Service:
    env = stack.airflow_process_env()
    argv = [sys.executable, "-m", "airflow", component]
    if component in ("scheduler", "triggerer"):
        argv.append("--skip-serve-logs")
    home = stack.path("airflow")
    started: list[datetime] = []

    def before_start() -> None:
        home.mkdir(parents=True, exist_ok=True)
        started.append(datetime.now(timezone.utc))
        if component == "api-server":
            _write_admin_password(stack)
            migrate(stack, env)

    def health() -> str | None:
        if component == "api-server":
            return http_ok(f"{stack.airflow_url}/api/v2/monitor/health")
        return heartbeat_since(stack.airflow_url, component.replace("-", "_"), started[-1] if started else None)

    return Service(name=f"airflow-{component}", argv=argv, env=env, log=home / f"{component}.log", cwd=home,
                   health=health, timeout=240, before_start=before_start,
                   url=stack.airflow_url if component == "api-server" else "")


def migrate(stack: Stack, env: dict[str, str]) -> None:
    """`airflow db migrate`: create or upgrade Airflow's tables in PostgreSQL (idempotent)."""
    log = stack.path("airflow", "db-migrate.log")
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=stack.path("airflow"),
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise StackError(f"airflow db migrate failed with status {proc.returncode}; see {log}")


def _write_admin_password(stack: Stack) -> None:
    """SimpleAuthManager's password file, with the stack's admin password (it would generate one otherwise)."""
    write_private(stack.path("airflow", "passwords.json"),
                   json.dumps({"admin": stack.secrets["airflow_admin_password"]}) + "\n")


def http_ok(url: str) -> str | None:
    try:
        with _NO_PROXY.open(url, timeout=5) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except OSError as exc:
        return f"no answer at {url} ({getattr(exc, 'reason', exc)})"


def heartbeat_since(airflow_url: str, component: str, since: datetime | None) -> str | None:
    """None once the health report of the api-server at `airflow_url` has a heartbeat of `component` from after
    `since` (an older one is a previous process's); `since` None: any recent heartbeat."""
    url = f"{airflow_url}/api/v2/monitor/health"
    try:
        with _NO_PROXY.open(url, timeout=5) as response:
            report = json.load(response).get(component) or {}
    except (OSError, ValueError) as exc:
        return f"no health report at {url} ({exc})"
    beat = report.get(f"latest_{component}_heartbeat")
    if report.get("status") != "healthy" or not beat:
        return f"{component} is {report.get('status') or 'not reporting'}"
    if since is not None and datetime.fromisoformat(beat) < since:
        return f"{component}'s last heartbeat is from before it started"
    return None


def pool_status(stack: Stack, pool: str) -> str:
    """One line on an Airflow pool, from the REST API as the admin: its slots and what holds them."""
    base = stack.airflow_url
    try:
        login = json.dumps({"username": "admin", "password": stack.secrets["airflow_admin_password"]}).encode()
        request = urllib.request.Request(f"{base}/auth/token", data=login, headers={"Content-Type": "application/json"})
        with _NO_PROXY.open(request, timeout=10) as response:
            token = json.load(response)["access_token"]
        request = urllib.request.Request(f"{base}/api/v2/pools/{pool}", headers={"Authorization": f"Bearer {token}"})
        with _NO_PROXY.open(request, timeout=10) as response:
            p = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return "missing: GPU steps never run; `make stack` creates it"
        return f"unknown ({base} answered {exc.code})"
    except (OSError, ValueError, KeyError) as exc:
        return f"unknown ({exc})"
    return (f"{p['slots']} slots{', deferred tasks counted' if p['include_deferred'] else ''}: {p['running_slots']} "
            f"running, {p['queued_slots']} queued, {p['deferred_slots']} deferred, {p['open_slots']} open")
