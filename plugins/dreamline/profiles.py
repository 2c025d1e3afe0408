"""Resource profiles: what a step needs, said once and used by both executors.

Locally a profile only names the step's needs (one CPU box runs everything). On Kubernetes it becomes the pod's
requests and limits, GPU node selector and toleration.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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


PROFILES = {
    # data preparation, selection, registration, MLflow bookkeeping
    "cpu": Profile(cpu="1", memory="4Gi"),
    # encode, train, evaluate: one GPU, enough host memory to load SDXL
    "gpu": Profile(cpu="8", memory="48Gi", gpus=1, node_selector={"dreamline.io/pool": "gpu"},
                   startup_timeout_seconds=1800, shm="8Gi", scratch="100Gi"),
    # data-parallel training over a node's GPUs (run under `accelerate launch`)
    "gpu-x4": Profile(cpu="32", memory="192Gi", gpus=4, node_selector={"dreamline.io/pool": "gpu"},
                      startup_timeout_seconds=1800, shm="32Gi", scratch="200Gi"),
}
