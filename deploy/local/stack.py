"""`make stack`: Dreamline's production shape as local processes. `python -m deploy.local.stack up|down|status`.

`up` starts, in order and each only once it answers, PostgreSQL, SeaweedFS (S3), the MLflow tracking server and
Airflow's api-server, scheduler, dag-processor and triggerer (LocalExecutor: the DAG's steps run as local
processes), makes the bucket, the offline tiny models, a DVC data registry holding the sample subject and
Airflow's `gpu` pool, prints the URLs and the login, and returns; the services keep running. The DAGs are those of
the subject registry given with --subjects (default: the repo's dags/subjects.yaml): `lora_<subject>` each, and
`publish_dataset`. Services already running are left alone, so a second `up` starts no duplicates. If one fails to
come up, `up` stops what it started and prints one line naming the service and its log.

`down` stops every service (SIGTERM, SIGINT for PostgreSQL; SIGKILL for whatever is left after --timeout) and then
any process still carrying the stack's mark in its environment; state stays on disk for the next `up`.

All state is in one folder (--folder, default $DREAMLINE_STACK or .stack/ in the repo); deploy/local/settings.py
says what goes where.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from deploy.local import bootstrap, models
from deploy.local.processes import Processes, StackError, end, folder_lock, leftovers
from deploy.local.seaweedfs import GRPC_OFFSET, is_free
from deploy.local.services import pool_status, services
from deploy.local.settings import DEFAULT_PORTS, REPO, Stack

PORT_FLAGS = {"airflow": "--airflow-port", "mlflow": "--mlflow-port", "s3": "--s3-port", "postgres": "--postgres-port"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.folder.expanduser().resolve()
    try:
        return args.command(folder, args)
    except (StackError, ValueError) as exc:
        print(f"error: stack: {exc}", file=sys.stderr)
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack", description=__doc__.split("\n\n")[0])
    default_folder = Path(os.environ.get("DREAMLINE_STACK") or REPO / ".stack")
    parser.add_argument("--folder", type=Path, default=default_folder,
                        help=f"the stack's state folder (default: $DREAMLINE_STACK or {REPO / '.stack'})")
    commands = parser.add_subparsers(required=True, metavar="{up,down,status}")
    up_parser = commands.add_parser("up", help="start the services (those not running yet)")
    up_parser.set_defaults(command=up)
    for service, flag in PORT_FLAGS.items():
        up_parser.add_argument(flag, type=int, default=None, dest=f"{service}_port",
                               help=f"{service} port on 127.0.0.1 (default {DEFAULT_PORTS[service]}, then kept)")
    up_parser.add_argument("--schedules", choices=("on", "off"), default=None,
                           help="off: the scheduler creates no scheduled runs, only triggered ones (default on)")
    up_parser.add_argument("--no-sample", dest="sample", action="store_false",
                           help="leave the data registry empty instead of publishing sample_data/dog as dog-v1")
    up_parser.add_argument("--subjects", metavar="FILE", default=None,
                           help="the subject registry the DAGs are made from (DREAMLINE_SUBJECTS): a YAML file, or "
                                "variable:NAME for an Airflow Variable (default: dags/subjects.yaml, then kept)")
    up_parser.add_argument("--gpu-slots", type=int, default=None, metavar="N",
                           help="slots of Airflow's gpu pool, how many GPU steps run at once (default: "
                                "$DREAMLINE_GPU_SLOTS, else 2 on the first up, then kept)")
    down_parser = commands.add_parser("down", help="stop the services; state stays on disk")
    down_parser.set_defaults(command=down)
    down_parser.add_argument("--timeout", type=float, default=30.0,
                             help="seconds a service has to stop before it is killed (default 30)")
    commands.add_parser("status", help="which services run, and their URLs").set_defaults(command=status)
    return parser.parse_args(argv)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One `up` or `down` at a time per stack folder (private to its user: logs and records name the services)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    with folder_lock(folder, f"{folder}: another `stack up` or `stack down` is running on this folder"):
        yield


def up(folder: Path, args: argparse.Namespace) -> int:
    started_at = time.monotonic()
    with locked(folder):
        procs = Processes(folder)
        stack, pool_changed = configured(folder, args, procs)
        print(f"Dreamline stack in {folder}", flush=True)
        started = []
        try:
            for service in services(stack):
                process = procs.running(service.name)
                if process is not None:
                    procs.wait_healthy(service)
                    print(f"  {service.name:<22} already running (pid {process.pid})", flush=True)
                else:
                    check_ports_free(stack, service.name)
                    began = time.monotonic()
                    started.append(service)
                    process = procs.start(service)
                    print(f"  {service.name:<22} up in {time.monotonic() - began:4.0f} s (pid {process.pid})",
                          flush=True)
                prepare_after(stack, service.name, args.sample, pool=pool_changed or service in started)
        except BaseException:
            for service in reversed(started):  # leave no half-started stack behind
                procs.stop(service.name, service.stop_signal, timeout=15)
            raise
    print(f"Up in {time.monotonic() - started_at:.0f} s.\n")
    print(summary(stack))
    return 0


def configured(folder: Path, args: argparse.Namespace, procs: Processes) -> tuple[Stack, bool]:
    """The stack's settings, and whether the gpu pool's size was asked for: created on the first `up`; ports,
    schedules or a subject registry asked for differently later are taken only while nothing runs (the Airflow
    components read them when they start); the pool's size is taken at any time."""
    requested = {service: getattr(args, f"{service}_port") for service in PORT_FLAGS}
    schedules = None if args.schedules is None else args.schedules == "on"
    subjects = registry_source(args.subjects)
    slots = gpu_slots(args.gpu_slots)
    chosen = models.chosen(os.environ, folder / "models", Path.cwd())  # the caller's, each `up`
    hub = {} if chosen == models.tiny_models(folder / "models") else chosen  # kept: models other than the tiny set
    gpus = models.gpu_environment(chosen)  # a machine without CUDA is refused here
    stack = Stack.load(folder)
    if stack is None:
        stack = Stack.create(folder, requested, schedules=True if schedules is None else schedules,
                             subjects=subjects, gpu_slots=slots or int(gpus.get("DREAMLINE_GPU_SLOTS", 2)))
        stack.models, stack.gpu_devices = hub, gpus.get("DREAMLINE_GPU_DEVICES", "")
    else:
        changes = {s: p for s, p in requested.items() if p is not None and p != stack.ports[s]}
        if (changes or (schedules is not None and schedules != stack.schedules)
                or (subjects is not None and subjects != stack.subjects) or hub != stack.models):
            running = [s.name for s in services(stack) if procs.running(s.name)]
            if running:
                raise StackError(f"{folder}: the stack is running ({', '.join(running)}) with other settings; "
                                 f"stop it first (make stack-down)")
            stack.ports.update(changes)
            if schedules is not None:
                stack.schedules = schedules
            if subjects is not None:
                stack.subjects = subjects
            stack.models, stack.gpu_devices = hub, gpus.get("DREAMLINE_GPU_DEVICES", "")
            if len(set(stack.ports.values())) < len(stack.ports):
                raise ValueError(f"two services were given the same port: {stack.ports}")
        if slots is not None:
            stack.gpu_slots = slots
    stack.save()
    return stack, slots is not None


def registry_source(value: str | None) -> str | None:
    """--subjects as the DAGs will read it: an absolute path to a registry that reads well, or variable:NAME."""
    if value is None or value.startswith("variable:"):
        return value
    path = Path(value).expanduser().resolve()
    bootstrap.subject_names(str(path))  # refuses, in one line, a registry the DAGs could not be made from
    return str(path)


def gpu_slots(value: int | None) -> int | None:
    if value is None and os.environ.get("DREAMLINE_GPU_SLOTS"):
        try:
            value = int(os.environ["DREAMLINE_GPU_SLOTS"])
        except ValueError:
            raise ValueError(f"DREAMLINE_GPU_SLOTS={os.environ['DREAMLINE_GPU_SLOTS']!r}: not a number") from None
    if value is not None and value < 1:
        raise ValueError(f"gpu slots: {value}; at least 1, else no GPU step ever runs")
    return value


def check_ports_free(stack: Stack, name: str) -> None:
    if name == "s3":
        ports = {stack.ports["s3"]: PORT_FLAGS["s3"], stack.ports["s3"] + GRPC_OFFSET: "its gRPC port"}
        for component, port in stack.seaweedfs_ports.items():
            ports |= {port: f"SeaweedFS's {component}", port + GRPC_OFFSET: f"SeaweedFS's {component} gRPC"}
    else:
        service = {"postgres": "postgres", "mlflow": "mlflow", "airflow-api-server": "airflow"}.get(name)
        ports = {stack.ports[service]: PORT_FLAGS[service]} if service else {}
    for port, what in ports.items():
        if not is_free(port):
            hint = f"pick another with {what}" if what.startswith("--") else f"({what}) free it"
            raise StackError(f"{name}: port {port} on 127.0.0.1 is in use by another program; {hint} "
                             f"(if it is this stack's, run `make stack-down` first)")


def prepare_after(stack: Stack, name: str, sample: bool, pool: bool) -> None:
    """What a service's users need once it answers (each step skips itself when done before; the gpu pool is set
    when the api-server was started now, or its size was asked for)."""
    if name == "postgres":
        from deploy.local.postgres import ensure_database

        for database in ("airflow", "mlflow"):
            ensure_database(stack.ports["postgres"], stack.secrets["postgres_password"], database,
                            stack.secrets[f"{database}_db_password"])
    elif name == "s3":
        bootstrap.ensure_bucket(stack)
    elif name == "mlflow":  # before Airflow: a triggered run finds its models and data in place
        bootstrap.ensure_models(stack)
        if sample:
            bootstrap.publish_sample(stack)
    elif name == "airflow-api-server" and pool:  # before the scheduler: GPU steps wait for the pool forever
        bootstrap.ensure_pool(stack)


def summary(stack: Stack) -> str:
    rel = os.path.relpath(stack.folder)
    folder = rel if not rel.startswith("..") else str(stack.folder)
    try:
        names = bootstrap.subject_names(stack.subjects)
        dags = ", ".join(f"lora_{n}" for n in names) if names is not None else f"lora_<subject> for {stack.subjects}"
    except ValueError as exc:  # the dag-processor reports it as an import error too
        dags = f"(none: {exc})"
    return "\n".join([
        f"  Airflow   {stack.airflow_url}   login: admin / {stack.secrets['airflow_admin_password']}",
        f"  MLflow    {stack.mlflow_url}",
        f"  S3        {stack.s3_endpoint}   bucket {stack.bucket}; keys in {folder}/stack.env",
        f"  Postgres  127.0.0.1:{stack.ports['postgres']}   databases airflow, mlflow",
        f"  DAGs      {dags}, publish_dataset: unpause and trigger them in the UI",
        f"            subject registry {stack.subjects or REPO / 'dags' / 'subjects.yaml'}; "
        f"pool {bootstrap.GPU_POOL}: {stack.gpu_slots} slots",
        f"  Data      registry {stack.registry}"
        + ("" if bootstrap.has_version(stack, bootstrap.SAMPLE_TAG) else " (empty: publish-dataset into it)"),
        "" if stack.schedules else "  Scheduled runs are off (--schedules off): only triggered runs happen.",
        f"Use it from a shell: set -a; . {folder}/stack.env; set +a",
        "Stop it: make stack-down (state stays in the folder; make stack starts it again)",
    ]).replace("\n\n", "\n")


def down(folder: Path, args: argparse.Namespace) -> int:
    stack = Stack.load(folder)
    if stack is None:
        print(f"No stack in {folder}.")
        return 0
    with locked(folder):
        procs = Processes(folder)
        for service in reversed(services(stack)):
            if service.name == "mlflow":
                # Steps still running (in sessions of their own, out of the scheduler's process group) end
                # while MLflow, S3 and PostgreSQL are up, so they can mark their runs FAILED on the way out.
                still_up = [procs.running(name) for name in ("mlflow", "s3", "postgres")]
                end_leftovers(folder, args.timeout, spare=[p.pid for p in still_up if p])
            began = time.monotonic()
            if procs.stop(service.name, service.stop_signal, timeout=args.timeout):
                print(f"  {service.name:<22} stopped in {time.monotonic() - began:.0f} s", flush=True)
        end_leftovers(folder, args.timeout)
    print(f"Stopped. State kept in {folder}.")
    return 0


def end_leftovers(folder: Path, timeout: float, spare: list[int] = ()) -> None:
    if stray := leftovers(folder, spare):
        print(f"  ending {len(stray)} leftover process(es): {', '.join(str(p.pid) for p in stray)}", flush=True)
        end(stray, timeout=timeout)


def status(folder: Path, args: argparse.Namespace) -> int:
    stack = Stack.load(folder)
    if stack is None:
        print(f"No stack in {folder}.")
        return 3
    procs = Processes(folder)
    healthy = True
    for service in services(stack):
        process = procs.running(service.name)
        reason = service.health() if process else None
        state = "stopped" if process is None else f"running (pid {process.pid})" + (f", {reason}" if reason else "")
        healthy &= process is not None and reason is None
        print(f"  {service.name:<22} {state:<28} {service.url}")
    if healthy:
        print(f"  {'pool ' + bootstrap.GPU_POOL:<22} {pool_status(stack, bootstrap.GPU_POOL)}")
        print(summary(stack))
    return 0 if healthy else 3


if __name__ == "__main__":
    sys.exit(main())
