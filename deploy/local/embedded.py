"""`make ui`: the Airflow UI and the MLflow UI over the embedded deployment (DREAMLINE_HOME), until Ctrl-C.

Airflow's api-server, scheduler (LocalExecutor), dag-processor and triggerer run as processes of their own, as in
`make stack` (deploy/local/services.py), rather than under `airflow standalone`, so that each can be sized; MLflow
runs as `mlflow server` over the embedded tracking store. Sizing, from the CPUs this process may use (its affinity,
capped by a cgroup CPU quota; n below), unless the environment already sets the variable:

    AIRFLOW__CORE__PARALLELISM                 n         LocalExecutor forks this many workers when the scheduler
                                                         starts, busy or not (32 by default); one task per CPU
    AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES  n // 2    at least 1; forked while parsing a DAG file, then gone
    AIRFLOW__TRIGGERER__CAPACITY               100 n     triggers are coroutines inside the triggerer's process
    AIRFLOW__API__WORKERS                      1
    mlflow server --workers                    1
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION         false     no huey job consumers: they run MLflow's GenAI jobs
                                                         (scorers, prompt optimisation, trace rollups), unused here

The scheduler and triggerer run without their log servers (`--skip-serve-logs`): every component reads task logs
from AIRFLOW_HOME/logs. Idle, that is n + 8 processes, one more while parsing (`max_processes`);
docs/benchmarks.md has the figures against `airflow standalone`.

Before starting: the models (deploy/local/models.py: the tiny ones built if missing, or with DREAMLINE_MODELS=hub the
real ones fetched into the model cache and pinned, one `gpu` pool slot and one GPU per step on a machine with CUDA),
`airflow db migrate`, and the `gpu` pool where missing (deploy/local/pools.py). The admin login is
SimpleAuthManager's generated password (AIRFLOW_HOME/simple_auth_manager_passwords.json.generated), printed once
the api-server answers. The services run in sessions of their own (deploy/local/processes.py), recorded under
DREAMLINE_HOME/ui/pids; Ctrl-C, SIGTERM or SIGHUP stops them in reverse order and then ends anything still carrying
the mark, and a later `make ui` stops what a killed one left running. Logs: DREAMLINE_HOME/ui-logs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from deploy.local import models
from deploy.local.pools import ensure_gpu_pool
from deploy.local.processes import Processes, Service, StackError, end, folder_lock, leftovers
from deploy.local.seaweedfs import is_free
from deploy.local.services import AIRFLOW_COMPONENTS, heartbeat_since, http_ok
from deploy.local.settings import HOST, REPO
from sd_tasks.data.images import usable_cpus

DEFAULT_PORTS = {"airflow": 8080, "mlflow": 5000}
STOP_TIMEOUT = 20.0  # seconds a service has to stop before its process group is killed


# (variable, what the startup line calls it, its value for n CPUs): see the module's docstring
SIZING = [
    ("AIRFLOW__CORE__PARALLELISM", "parallelism", lambda n: n),
    ("AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES", "parsing processes", lambda n: max(1, n // 2)),
    ("AIRFLOW__TRIGGERER__CAPACITY", "triggerer capacity", lambda n: 100 * n),
    ("AIRFLOW__API__WORKERS", "api-server workers", lambda n: 1),
]


def sizing(cpus: int) -> dict[str, str]:
    """The Airflow settings sized to `cpus`."""
    return {variable: str(value(cpus)) for variable, _, value in SIZING}


def max_processes(cpus: int) -> int:
    """The most processes `make ui` runs while no task runs: the launcher, MLflow's command and its server, the
    four Airflow components and the triggerer's trigger runner, the scheduler's LocalExecutor workers (parallelism),
    and the dag-processor's parsing processes while it parses."""
    return 1 + 2 + 4 + 1 + cpus + max(1, cpus // 2)


class Embedded:
    """The embedded deployment's services: their environment, commands, logs and health checks."""

    def __init__(self, home: Path, airflow_home: Path, ports: dict[str, int], cpus: int):
        self.home, self.airflow_home, self.ports, self.cpus = home, airflow_home, ports, cpus
        self.folder, self.logs = home / "ui", home / "ui-logs"
        self.airflow_url = f"http://{HOST}:{ports['airflow']}"
        self.mlflow_url = f"http://{HOST}:{ports['mlflow']}"

    def env(self) -> dict[str, str]:
        """The Makefile's environment (DREAMLINE_HOME, AIRFLOW_HOME, dags/ and plugins/), the sizing where not set
        already, the ports, and the venv's bin on PATH (steps run `python -m sd_tasks` with this interpreter)."""
        env = {**sizing(self.cpus), **os.environ}
        env.update({
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "AIRFLOW__API__HOST": HOST, "AIRFLOW__API__PORT": str(self.ports["airflow"]),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # the steps track into the store directly; a reviewer's browser loads images from the server
            "DREAMLINE_MLFLOW_UI_URL": os.environ.get("DREAMLINE_MLFLOW_UI_URL") or self.mlflow_url,
        })
        return env

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def passwords(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"

    def services(self, env: dict[str, str]) -> list[Service]:
        """In start order: the api-server first (the others report their heartbeats through it)."""
        airflow = [self.airflow_service(component, env) for component in AIRFLOW_COMPONENTS]
        return [airflow[0], self.mlflow_service(env), *airflow[1:]]

    def mlflow_service(self, env: dict[str, str]) -> Service:
        folder = self.home / "mlflow"  # its working folder too: nothing lands in the checkout
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.tracking_uri,
                "--host", HOST, "--port", str(self.ports["mlflow"]), "--workers", "1"]
        return Service(name="mlflow", argv=argv, env=env, log=self.logs / "mlflow.log", cwd=folder,
                       health=lambda: http_ok(f"{self.mlflow_url}/health"), timeout=180, url=self.mlflow_url)

    def airflow_service(self, component: str, env: dict[str, str]) -> Service:
        argv = [sys.executable, "-m", "airflow", component]
        if component in ("scheduler", "triggerer"):
            argv.append("--skip-serve-logs")
        started: list[datetime] = []

        def health() -> str | None:
            if component == "api-server":
                return http_ok(f"{self.airflow_url}/api/v2/monitor/health")
            return heartbeat_since(self.airflow_url, component.replace("-", "_"), started[-1] if started else None)

        return Service(name=f"airflow-{component}", argv=argv, env=env, log=self.logs / f"airflow-{component}.log",
                       cwd=self.airflow_home, health=health, timeout=180,
                       before_start=lambda: started.append(datetime.now(timezone.utc)),
                       url=self.airflow_url if component == "api-server" else "")

    def login(self) -> str:
        try:
            users = json.loads(self.passwords.read_text())
        except (OSError, ValueError):
            return f"see {self.logs / 'airflow-api-server.log'}"
        return ", ".join(f"{user} / {password}" for user, password in users.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ui", description=__doc__.split("\n\n")[0])
    for service, default in DEFAULT_PORTS.items():
        variable = f"DREAMLINE_{service.upper()}_PORT"
        parser.add_argument(f"--{service}-port", type=int, default=int(os.environ.get(variable) or default),
                            help=f"{service} port on {HOST} (default ${variable} or {default})")
    args = parser.parse_args(argv)
    embedded = Embedded(Path(os.environ["DREAMLINE_HOME"]).resolve(), Path(os.environ["AIRFLOW_HOME"]).resolve(),
                        {"airflow": args.airflow_port, "mlflow": args.mlflow_port}, usable_cpus())
    try:
        chosen = models.chosen(os.environ, embedded.home / "models", Path.cwd())
        os.environ.update(models.environment(chosen))
        os.environ.update(models.gpu_environment(chosen))
    except ValueError as exc:  # before anything starts
        print(f"error: make ui: {exc}", file=sys.stderr)
        return 1
    try:
        with folder_lock(embedded.folder, f"another `make ui` is running over {embedded.folder.parent}"), \
                stop_on_signals():
            prepare_models(embedded, chosen)
            return run(embedded)
    except (StackError, ValueError, RuntimeError) as exc:
        print(f"error: make ui: {exc}", file=sys.stderr)
        return 1


def prepare_models(embedded: Embedded, chosen: dict[str, str]) -> None:
    """The tiny models built if missing; hub models fetched into the model cache now (minutes the first time), so
    the first night does not begin with the download and a wrong id or an unreachable hub is said here."""
    folder = embedded.home / "models"
    if models.from_hub(chosen):
        print("Fetching the models into the model cache (the first time: about 16 GB)...", flush=True)
    ready = models.prepare(chosen, folder, dict(os.environ), embedded.home / "steps")
    gpus = os.environ.get("DREAMLINE_GPU_DEVICES")
    print(f"Models: {', '.join(ready.values())}; "
          f"{f'GPUs {gpus}, one per GPU step' if gpus else 'steps on the CPU'}.", flush=True)


def run(embedded: Embedded) -> int:
    procs, env = Processes(embedded.folder), embedded.env()
    services = embedded.services(env)
    try:
        stop_all(embedded, procs, services, quiet=False)  # what a killed `make ui` left running
        for name, port in embedded.ports.items():
            if not is_free(port):
                raise StackError(f"port {port} on {HOST} is in use by another program: pick another with "
                                 f"--{name}-port or DREAMLINE_{name.upper()}_PORT")
        began = time.monotonic()
        print(f"Embedded deployment in {embedded.home}, sized to {embedded.cpus} CPUs: "
              + ", ".join(f"{label} {env[variable]}" for variable, label, _ in SIZING), flush=True)
        (embedded.home / "mlflow").mkdir(parents=True, exist_ok=True)
        embedded.logs.mkdir(parents=True, exist_ok=True)
        migrate(env, embedded.logs / "db-migrate.log")
        popens = [procs.launch(service) for service in services]
        pool = ensure_gpu_pool(env, cwd=embedded.airflow_home)  # while the services start
        for service, popen in zip(services, popens):
            procs.wait_healthy(service, popen)
        print(f"Up in {time.monotonic() - began:.0f} s (pool gpu: {pool['slots']} slot(s)).\n")
        print(f"Airflow UI: http://localhost:{embedded.ports['airflow']}  login: {embedded.login()}")
        print(f"MLflow UI:  http://localhost:{embedded.ports['mlflow']}")
        print(f"Logs in {embedded.logs}. Ctrl-C stops both.", flush=True)
        while True:
            for service, popen in zip(services, popens):
                if popen.poll() is not None:
                    raise StackError(f"{service.name} exited with status {popen.returncode}; see {service.log}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    finally:
        stop_all(embedded, procs, services, quiet=True)


def migrate(env: dict[str, str], log: Path) -> None:
    """`airflow db migrate`: create or upgrade the embedded database (idempotent)."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise StackError(f"airflow db migrate failed with status {proc.returncode}; see {log}")


def stop_all(embedded: Embedded, procs: Processes, services: list[Service], quiet: bool) -> None:
    """Stop the services: first those that run tasks and parse DAGs, together, then the api-server (tasks ending
    meanwhile report to it) and MLflow, together; then end any process still carrying their mark (a task's
    process that left its group). Each has STOP_TIMEOUT seconds before its process group is killed."""
    def stop(service: Service) -> None:
        if procs.stop(service.name, service.stop_signal, timeout=STOP_TIMEOUT) and not quiet:
            print(f"  stopped {service.name}, left running by an earlier `make ui`", flush=True)

    servers = {"airflow-api-server", "mlflow"}
    with ignoring_signals():  # a second Ctrl-C must not leave half of them running
        for phase in ([s for s in services if s.name not in servers], [s for s in services if s.name in servers]):
            with ThreadPoolExecutor(len(phase)) as pool:
                list(pool.map(stop, phase))
        if stray := leftovers(embedded.folder):
            end(stray, timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (kill) and SIGHUP (the terminal closed) stop the services as Ctrl-C does; so does SIGINT even when
    the launcher started with it ignored (in the background of a script), which Python would leave ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
