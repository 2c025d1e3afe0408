"""Measuring one trainer run for bench/train.py: wall time, CPU time, peak memory, the torch threads it ran with, and
when each step ended.

CPU time is the user + system seconds of the run's whole process tree, from wait4's rusage: the trainer and, for
the reference, `accelerate launch` above it (the launcher's share is the same in a run of N and of 2N steps, so it
cancels in bench/train.py's per-step figure). Threads come from a probe: a `sitecustomize.py` that every Python of
the run imports at start-up (its folder leads PYTHONPATH) and that writes, at exit, each process's
`torch.get_num_threads()`, `torch.get_num_interop_threads()` and its own CPU seconds to a file; the trainer is the
process that started no other (for the reference, the script, not `accelerate launch` above it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

PROGRESS = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
PROBE_ENV = "DREAMLINE_BENCH_PROBE"
PROBE = f'''"""bench/measure.py's probe: at exit, note this process's torch threads and CPU seconds."""
import atexit, os, sys


def _note():
    torch, path = sys.modules.get("torch"), os.environ.get("{PROBE_ENV}")
    if torch is None or not path:
        return
    import json, resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(path, "a") as f:
        f.write(json.dumps({{"pid": os.getpid(), "ppid": os.getppid(), "argv0": sys.argv[0],
                            "threads": torch.get_num_threads(),
                            "interop_threads": torch.get_num_interop_threads(),
                            "cpu_s": usage.ru_utime + usage.ru_stime}}) + "\\n")


atexit.register(_note)
'''


class RunFailed(RuntimeError):
    pass


def write_probe(folder: Path) -> Path:
    """The probe's folder, to put first on the runs' PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(PROBE)
    return folder


def timed(cmd: list[str], env: dict, out: Path, device: str) -> dict:
    """Run `cmd`; wall and CPU seconds, peak memory (MiB), the trainer's threads, when each progress-bar step
    appeared on its stderr. Raises RunFailed with the end of its stderr if it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.parent / f"{out.name}.probe.jsonl"
    probe.unlink(missing_ok=True)
    stdout, stderr, stamps = [], [], {}
    gpu = GpuPoller() if device == "cuda" else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env | {PROBE_ENV: str(probe)}, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [threading.Thread(target=lambda: stdout.append(proc.stdout.read())),
               threading.Thread(target=read_progress, args=(proc.stderr, stderr, stamps))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    gpu_peak = gpu.stop() if gpu else None
    text_out, text_err = stdout[0].decode(errors="replace"), b"".join(stderr).decode(errors="replace")
    (out.parent / f"{out.name}.log").write_text(text_err + text_out)
    if proc.returncode:
        raise RunFailed(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{text_err[-3000:]}")
    processes = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    parents = {p["ppid"] for p in processes}  # `accelerate launch` is the script's parent
    trainer = max((p for p in processes if p["pid"] not in parents), key=lambda p: p["cpu_s"], default={})
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_mib": gpu_peak if gpu else usage.ru_maxrss / 1024,  # Linux: KiB
            "threads": trainer.get("threads"), "interop_threads": trainer.get("interop_threads"),
            "processes": processes, "stdout": text_out, "step_times": stamps}


def read_progress(stream, chunks: list[bytes], stamps: dict[int, float]) -> None:
    """Keep stderr; note when tqdm first shows each `Steps: ... k/N` (wall-clock seconds, like MLflow's)."""
    pending = b""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            return
        now = time.time()
        chunks.append(chunk)
        pending += chunk
        *lines, pending = re.split(rb"[\r\n]", pending)
        for line in lines:
            m = PROGRESS.search(line.decode(errors="replace"))
            if m:
                stamps.setdefault(int(m.group(1)), now)


class GpuPoller:
    """Peak nvidia-smi memory.used (MiB) above what was in use when it started."""

    def __init__(self, every: float = 0.2):
        self.base = self.used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def used() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True).stdout
        return float(out.split()[0])

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.used())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def inner_rate(runs: list[dict[int, float]], warmup: int, window: int = 5) -> float | None:
    """1 / the median seconds per step over windows of `window` steps after `warmup`, pooled over all runs: the
    median ignores the steps during which another process took the CPU; windows smooth over stamps that arrived
    together or were rounded to the millisecond. A run's stamp of step k is the moment step k ended."""
    per_step = sorted((stamps[k] - stamps[k - window]) / window for stamps in runs for k in stamps
                      if k - window >= warmup and k - window in stamps)
    if not per_step or per_step[len(per_step) // 2] <= 0:
        return None
    return 1 / per_step[len(per_step) // 2]
