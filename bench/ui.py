"""What `make ui` costs the machine: processes and memory of its whole process tree once it has settled.

Starts `scripts/ui.py` (or the command after `--`) over an embedded state folder, waits until the Airflow
api-server's health endpoint and MLflow's /health answer, lets it settle for --settle seconds, then samples its
process tree (the command and every descendant) --samples times, 2 s apart, and reports the last sample: process
count, the sum of RSS (counts pages shared between forked processes once per process, so it overstates) and the
sum of PSS (shares each shared page out among its users: what the tree really holds). Then it presses Ctrl-C
(SIGINT to the command's process group, as a terminal does), times the shutdown, and lists any process of the tree
still alive after it.

    .venv/bin/python bench/ui.py --home .dreamline                     # the current scripts/ui.py
    .venv/bin/python bench/ui.py --home .dreamline -- python old_ui.py # another launcher

The environment is the Makefile's (DREAMLINE_HOME, AIRFLOW_HOME=<home>/airflow, dags/ and plugins/, no examples).
The ports are 8080 and 5000 unless --airflow-port / --mlflow-port (passed to the launcher as DREAMLINE_AIRFLOW_PORT
and DREAMLINE_MLFLOW_PORT; a launcher that ignores them must find 8080 and 5000 free).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=REPO / ".dreamline", help="DREAMLINE_HOME (default .dreamline)")
    parser.add_argument("--settle", type=float, default=60, help="seconds after both UIs answer (default 60)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--airflow-port", type=int, default=8080)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("command", nargs="*", help="the launcher (default: scripts/ui.py with this Python)")
    args = parser.parse_args()
    home = args.home.resolve()
    env = {**os.environ, "DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_AIRFLOW_PORT": str(args.airflow_port),
           "DREAMLINE_MLFLOW_PORT": str(args.mlflow_port), "NO_PROXY": "127.0.0.1,localhost"}
    command = args.command or [sys.executable, str(REPO / "scripts" / "ui.py")]
    urls = [f"http://127.0.0.1:{args.airflow_port}/api/v2/monitor/health",
            f"http://127.0.0.1:{args.mlflow_port}/health"]

    began = time.monotonic()
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    peak = 0
    try:
        while not all(answers(url) for url in urls):
            if proc.poll() is not None:
                print(proc.stdout.read())
                sys.exit(f"the launcher exited with status {proc.returncode} before both UIs answered")
            peak = max(peak, len(tree(proc.pid)))
            time.sleep(1)
        up = time.monotonic() - began
        print(f"both UIs answer after {up:.0f} s; settling {args.settle:.0f} s", flush=True)
        settle_end = time.monotonic() + args.settle
        while time.monotonic() < settle_end:
            peak = max(peak, len(tree(proc.pid)))
            time.sleep(1)
        for i in range(args.samples):
            procs = tree(proc.pid)
            peak = max(peak, len(procs))
            sample = measure(procs)
            if i < args.samples - 1:
                time.sleep(2)
    finally:
        seen = tree(proc.pid)
        stop_began = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        stopped = time.monotonic() - stop_began
        time.sleep(2)
    left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    result = {"command": " ".join(command[-2:]), "cpus": os.cpu_count(), "up_s": round(up), "settle_s": args.settle,
              **sample, "peak_processes": peak, "stop_s": round(stopped, 1),
              "left_running": [f"{p.pid} {name(p)}" for p in left]}
    print(json.dumps(result, indent=2))
    print("launcher output (last lines):\n" + "\n".join(output.splitlines()[-8:]))
    for p in left:  # ours: the launcher left them
        p.kill()
    return 0


def answers(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def name(p: psutil.Process) -> str:
    """A short name: the interpreter's module or script and its subcommand, else the executable."""
    try:
        argv = p.cmdline()
    except psutil.Error:
        return "?"
    if len(argv) > 2 and argv[1] == "-m":
        return " ".join(argv[2:4])
    if len(argv) > 1 and "python" in Path(argv[0]).name:
        return " ".join([Path(argv[1]).name, *argv[2:3]])
    return p.name()


def measure(procs: list[psutil.Process]) -> dict:
    rss = pss = 0
    kinds = collections.Counter()
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
            kinds[name(p) if p.name().startswith("python") else p.name()] += 1
        except psutil.Error:
            continue
    return {"processes": len(procs), "rss_mib": round(rss / 2**20), "pss_mib": round(pss / 2**20),
            "by_name": dict(kinds.most_common())}


if __name__ == "__main__":
    sys.exit(main())
