"""`make demo` from an empty DREAMLINE_HOME, this checkout against another commit, side by side on one machine.

    .venv/bin/python bench/demo.py --baseline 204dbef --rounds 2

The baseline commit is checked out (`git worktree`) into a temporary folder and both run with this checkout's
.venv, alternating (baseline, current, baseline, current, ...) so that a change in the machine's load falls on both;
each run gets a new empty DREAMLINE_HOME and the Makefile's environment for its checkout, with the tiny models'
settings given explicitly (the baseline's Makefile exported them; the current code takes them as the tiny set).
Prints each run's wall seconds, the load average before and after it, the per-task seconds the demo printed, and the
ratio of the medians; `--json FILE` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_LINE = re.compile(r"^  (\S.*?)\s+(success|failed|skipped|upstream_failed)\s+([\d.]+) s$")


def demo_env(checkout: Path, home: Path) -> dict[str, str]:
    """The Makefile's exports for `checkout` over an empty `home`, and the tiny models named explicitly."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DREAMLINE_", "AIRFLOW", "MLFLOW_", "HF_", "FORCE"))}
    return {**env, "DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(checkout / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(checkout / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "DREAMLINE_BASE_MODEL": str(home / "models" / "tiny-sdxl"),
            "DREAMLINE_CLIP_MODEL": str(home / "models" / "evaluators" / "clip"),
            "DREAMLINE_DINO_MODEL": str(home / "models" / "evaluators" / "dino"),
            "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


def run_demo(checkout: Path, scratch: Path, label: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"demo-{label}-", dir=scratch))
    load_before = os.getloadavg()[0]
    began = time.monotonic()
    proc = subprocess.run([sys.executable, str(checkout / "scripts" / "demo.py")], cwd=checkout,
                          env=demo_env(checkout, home), capture_output=True, text=True)
    seconds = time.monotonic() - began
    if proc.returncode != 0:
        raise SystemExit(f"error: {label}: make demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tasks = {m[1].strip(): float(m[3]) for m in map(TASK_LINE.match, proc.stdout.splitlines()) if m}
    return {"label": label, "seconds": round(seconds, 1), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "tasks": tasks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. the last landed one)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline], cwd=REPO,
                       check=True)
        try:
            runs = []
            for number in range(args.rounds):
                for label, checkout in (("baseline", baseline), ("current", REPO)):
                    runs.append(run_demo(checkout, Path(scratch), label))
                    print(f"round {number + 1} {label:<8} {runs[-1]['seconds']:7.1f} s  load "
                          f"{runs[-1]['load_before']:.2f} -> {runs[-1]['load_after']:.2f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO)
    median = {label: statistics.median(r["seconds"] for r in runs if r["label"] == label)
              for label in ("baseline", "current")}
    print(f"median: baseline {median['baseline']:.1f} s, current {median['current']:.1f} s, "
          f"ratio {median['current'] / median['baseline']:.2f} ({os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "runs": runs, "median": median}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
