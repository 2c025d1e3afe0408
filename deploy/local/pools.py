"""The Airflow pool the DAG's GPU steps run in: `gpu`, created when missing.

Its size is DREAMLINE_GPU_SLOTS (default 1): set, it is applied every time (a changed value resizes the pool);
unset, a missing pool is created with 1 slot and an existing one keeps its size (say, one set in the UI). Deferred
tasks count against it (`include_deferred`, as `airflow pools set gpu N "GPU slots" --include-deferred` would do):
a deferrable KubernetesPodOperator waiting on its pod still holds its GPU.

    ensure_gpu_pool(env)   # env: the Airflow environment of the deployment (AIRFLOW_HOME or its database URL)

This runs one Python process that reads and writes the pool through Airflow's models, which is what `airflow pools
set` calls too (through its local API client): one process instead of `pools get` plus `pools set`, about 3 s
instead of 10 on two busy cores, and it can leave an existing pool alone, which `pools set` cannot.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GPU_POOL = "gpu"
GPU_POOL_DESCRIPTION = "GPU slots (DREAMLINE_GPU_SLOTS)"

_SCRIPT = """
import json, sys
from airflow.models.pool import Pool
from airflow.utils.session import create_session

name, slots, description = sys.argv[1], sys.argv[2], sys.argv[3]
with create_session() as session:
    pool = Pool.get_pool(name, session=session)
    if pool is None or (slots and int(slots) != pool.slots):
        pool = Pool.create_or_update_pool(name, int(slots or 1), description, include_deferred=True,
                                          session=session)
        session.flush()
        print(json.dumps({"slots": pool.slots, "changed": True}))
    else:
        print(json.dumps({"slots": pool.slots, "changed": False}))
"""


def gpu_slots(env: dict[str, str] | None = None) -> str:
    """DREAMLINE_GPU_SLOTS as given ("" when unset); ValueError unless a whole number of at least 1."""
    value = (os.environ if env is None else env).get("DREAMLINE_GPU_SLOTS", "").strip()
    if value and not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"DREAMLINE_GPU_SLOTS={value!r}: give a whole number of GPU slots, at least 1")
    return value


def ensure_gpu_pool(env: dict[str, str], cwd: Path | None = None) -> dict:
    """Create the `gpu` pool if missing (or resize it to DREAMLINE_GPU_SLOTS when that is set): {"slots": n,
    "changed": bool}. Needs Airflow's database migrated. RuntimeError with Airflow's output when it fails."""
    argv = [sys.executable, "-c", _SCRIPT, GPU_POOL, gpu_slots(env), GPU_POOL_DESCRIPTION]
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"could not create Airflow pool {GPU_POOL!r} (status {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return json.loads(lines[-1])
