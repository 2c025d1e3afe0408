"""Resource profiles: what a step needs, said once and used by both executors.

Locally a profile only names the step's needs (one CPU box runs everything). On Kubernetes it becomes the pod's
requests and limits, GPU node selector and toleration. Either way a GPU profile takes slots of Airflow's `gpu` pool
(created by setup, `DREAMLINE_GPU_SLOTS` slots, deferred pods counted), so a sweep never asks for more GPUs at once
than the deployment has; and every step has a time limit, so a hung step cannot block the nights after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

GPU_POOL = "gpu"


@dataclass(frozen=True)
class Profile:
    cpu: str
    memory: str
    gpus: int = 0
    node_selector: dict = field(default_factory=dict)
    startup_timeout_seconds: int = 600  # GPU nodes can take minutes to scale up; KPO's default is 120 s
    shm: str | None = None  # size of a memory-backed /dev/shm (counted in `memory`)
    # Scratch disk (/tmp): fetched inputs (an encode cache, a sweep's evaluation images), outputs before upload, and
    # the Hugging Face cache when no model-cache volume is set. Requested, so the scheduler places it, and limited.
    scratch: str = "20Gi"
    pool: str = "default_pool"
    pool_slots: int = 1


PROFILES = {
    # data preparation, selection, registration, MLflow bookkeeping
    "cpu": Profile(cpu="1", memory="4Gi"),
    # encode, train, evaluate: one GPU, enough host memory to load SDXL
    "gpu": Profile(cpu="8", memory="48Gi", gpus=1, node_selector={"dreamline.io/pool": "gpu"},
                   startup_timeout_seconds=1800, shm="8Gi", scratch="100Gi", pool=GPU_POOL, pool_slots=1),
    # data-parallel training over a node's GPUs (run under `accelerate launch`)
    "gpu-x4": Profile(cpu="32", memory="192Gi", gpus=4, node_selector={"dreamline.io/pool": "gpu"},
                      startup_timeout_seconds=1800, shm="32Gi", scratch="200Gi", pool=GPU_POOL, pool_slots=4),
}

# A step still running after this fails (and is retried when the failure may pass): generous for SDXL at 1024 px on
# one GPU, far below a night. Steps not listed get DEFAULT_TIMEOUT.
STEP_TIMEOUTS = {
    "pin-models": timedelta(hours=3),  # SDXL base is about 14 GB the first time; then one request per model
    "dataset": timedelta(hours=1), "validate": timedelta(hours=1), "resize": timedelta(hours=1),
    "caption": timedelta(hours=2), "encode": timedelta(hours=3), "class-images": timedelta(hours=2),
    "train": timedelta(hours=8), "evaluate": timedelta(hours=3),
}
DEFAULT_TIMEOUT = timedelta(minutes=30)


def step_resources(step: str, profile: str) -> dict:
    """Airflow task arguments for a step on a profile: its pool, pool slots and time limit. A mapped task needs them
    in `.partial()`, where the scheduler reads them."""
    p = PROFILES[profile]
    return {"pool": p.pool, "pool_slots": p.pool_slots,
            "execution_timeout": STEP_TIMEOUTS.get(step, DEFAULT_TIMEOUT)}
