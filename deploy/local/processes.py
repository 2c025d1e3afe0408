"""Background services as plain processes: start one detached with its log file, remember it, find it again, stop it.

Each service runs in a session (and so a process group) of its own, so it outlives the `stack up` that started it
and can be stopped together with whatever it spawned (Airflow's task processes, uvicorn workers, postgres
backends). Its pid and start time are recorded in `<pids>/<name>.json`; a record whose process is gone, or whose
pid now belongs to another process (pid reuse), counts as stopped, so a stale record never blocks a restart and
never gets an unrelated process killed.

Every service started here carries MARK=<stack folder> in its environment, inherited by all its descendants, so
`leftovers` finds anything of a stack still running after its services stopped, even a process that left its
group (Airflow runs each task in a process group of its own). Only services get the mark: a shell that sourced the
stack's stack.env does not, so `down` never ends the user's own processes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import psutil

MARK = "DREAMLINE_STACK_SERVICE"


class StackError(RuntimeError):
    """A service failed: the message is one line naming the service, the reason and its log file."""


@contextlib.contextmanager
def folder_lock(folder: Path, busy: str) -> Iterator[None]:
    """Hold `folder`'s lock file for the block: one launcher at a time per state folder; `busy` is the error when
    another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(busy) from None
        yield


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    health: Callable[[], str | None]  # None when healthy, else why not (one line)
    timeout: float = 120.0  # seconds to become healthy
    stop_signal: int = signal.SIGTERM  # sent to the service's main process; its group is killed after the timeout
    url: str = ""
    before_start: Callable[[], None] | None = field(default=None, repr=False)


class Processes:
    """The services of the stack in `folder`, recorded under its pids/."""

    def __init__(self, folder: Path):
        self.folder, self.pids = folder, folder / "pids"

    def _record(self, name: str) -> Path:
        return self.pids / f"{name}.json"

    def running(self, name: str) -> psutil.Process | None:
        """The service's main process if it is alive (and is the process we started, not a reused pid)."""
        try:
            record = json.loads(self._record(name).read_text())
            process = psutil.Process(record["pid"])
            if abs(process.create_time() - record["create_time"]) > 0.5 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except (FileNotFoundError, json.JSONDecodeError, KeyError, psutil.Error):
            return None

    def start(self, service: Service) -> psutil.Process:
        """Start the service detached; wait until it is healthy or fail with one line naming it and its log."""
        popen = self.launch(service)
        self.wait_healthy(service, popen)
        return psutil.Process(popen.pid)

    def launch(self, service: Service) -> subprocess.Popen:
        """Start the service detached and record it, without waiting for it to answer."""
        service.cwd.mkdir(parents=True, exist_ok=True)
        service.log.parent.mkdir(parents=True, exist_ok=True)
        if service.before_start:
            service.before_start()
        self.pids.mkdir(parents=True, exist_ok=True)
        with open(service.log, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {service.name}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(service.argv, env={**service.env, MARK: str(self.folder)}, cwd=service.cwd,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            except OSError as exc:
                raise StackError(f"{service.name}: cannot run {service.argv[0]}: {exc.strerror}") from None
        process = psutil.Process(popen.pid)
        self._record(service.name).write_text(json.dumps(
            {"pid": popen.pid, "create_time": process.create_time()}) + "\n")
        return popen

    def wait_healthy(self, service: Service, popen: subprocess.Popen | None = None) -> None:
        """Until the service's health check passes; one line naming it and its log when it exits or times out."""
        deadline = time.monotonic() + service.timeout
        while True:
            reason = service.health()
            if reason is None:
                return
            if popen is not None and popen.poll() is not None:
                raise StackError(f"{service.name} exited with status {popen.returncode} while starting ({reason}); "
                                 f"see {service.log}")
            if popen is None and self.running(service.name) is None:
                raise StackError(f"{service.name} stopped while starting ({reason}); see {service.log}")
            if time.monotonic() > deadline:
                raise StackError(f"{service.name} did not come up in {service.timeout:.0f} s ({reason}); "
                                 f"see {service.log}")
            time.sleep(0.5)

    def stop(self, name: str, stop_signal: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Signal the service's main process, wait for its whole process group to end, SIGKILL whatever is left
        after `timeout`. False when it was not running."""
        process = self.running(name)
        self._record(name).unlink(missing_ok=True)
        if process is None:
            return False
        group = process.pid  # started with start_new_session: its pid is its group id
        try:
            process.send_signal(stop_signal)
        except psutil.NoSuchProcess:
            pass
        if not _wait_gone(lambda: _group_members(group), timeout):
            for member in _group_members(group):
                _kill(member)
            _wait_gone(lambda: _group_members(group), 10)
        return True


def leftovers(folder: Path, spare: Iterable[int] = ()) -> list[psutil.Process]:
    """Processes still running whose environment says they belong to the stack in `folder`, but for those in the
    process groups `spare` (services still meant to run)."""
    spare, found = set(spare), []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and os.getpgid(process.pid) not in spare and process.environ().get(MARK) == str(folder):
                found.append(process)
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to read
            continue
    return found


def end(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`, for each of these processes (by pid)."""
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        _kill(process)
    psutil.wait_procs(alive, timeout=5)


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def _wait_gone(members: Callable[[], list], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while members():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.Error:
        pass
