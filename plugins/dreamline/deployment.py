"""Where this Airflow deployment runs steps and keeps state, read once from the environment at parse time.

| variable | default | meaning |
| --- | --- | --- |
| DREAMLINE_HOME | `<repo>/.dreamline` | all local state: MLflow store, data registry, models, run folders |
| DREAMLINE_EXECUTOR | `local` | `local` runs steps as subprocesses, `kubernetes` as pods |
| DREAMLINE_STORAGE | `$DREAMLINE_HOME/runs` | root URI of run folders (s3://bucket/prefix in production) |
| DREAMLINE_CACHE | `$DREAMLINE_HOME/cache` | root URI of content-addressed caches shared by runs (encode) |
| DREAMLINE_DATASET_REPO | `$DREAMLINE_HOME/data-registry` | default DVC data registry (Git URL or path) |
| DREAMLINE_BASE_MODEL | stabilityai/stable-diffusion-xl-base-1.0 | default SDXL pipeline |
| DREAMLINE_CLIP_MODEL / DREAMLINE_DINO_MODEL | openai/clip-vit-large-patch14 / facebook/dino-vits16 | evaluators |
| DREAMLINE_CAPTION_MODEL | Salesforce/blip-image-captioning-large | captioner, when captions come from a model |
| MLFLOW_TRACKING_URI | `sqlite:///$DREAMLINE_HOME/mlflow/mlflow.db` | MLflow tracking and registry |
| DREAMLINE_IMAGE / DREAMLINE_NAMESPACE | dreamline:latest / dreamline | pod image and namespace (kubernetes) |
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Deployment:
    home: Path
    executor: str
    storage: str
    cache: str
    dataset_repo: str
    base_model: str
    clip_model: str
    dino_model: str
    caption_model: str
    tracking_uri: str
    image: str
    namespace: str
    step_env: dict = field(default_factory=dict)

    def cache_dir(self, name: str) -> str:
        return f"{self.cache.rstrip('/')}/{name}"

    def run_dir(self, dag_id: str, run_id: str) -> str:
        """The one folder (URI) that holds everything a pipeline run writes."""
        return f"{self.storage.rstrip('/')}/{dag_id}/{slug(run_id)}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def from_environment(env=os.environ) -> Deployment:
    home = Path(env.get("DREAMLINE_HOME", REPO_ROOT / ".dreamline")).resolve()
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return Deployment(
        home=home,
        executor=env.get("DREAMLINE_EXECUTOR", "local"),
        storage=env.get("DREAMLINE_STORAGE", str(home / "runs")),
        cache=env.get("DREAMLINE_CACHE", str(home / "cache")),
        dataset_repo=env.get("DREAMLINE_DATASET_REPO", str(home / "data-registry")),
        base_model=env.get("DREAMLINE_BASE_MODEL", "stabilityai/stable-diffusion-xl-base-1.0"),
        clip_model=env.get("DREAMLINE_CLIP_MODEL", "openai/clip-vit-large-patch14"),
        dino_model=env.get("DREAMLINE_DINO_MODEL", "facebook/dino-vits16"),
        caption_model=env.get("DREAMLINE_CAPTION_MODEL", "Salesforce/blip-image-captioning-large"),
        tracking_uri=tracking_uri,
        image=env.get("DREAMLINE_IMAGE", "dreamline:latest"),
        namespace=env.get("DREAMLINE_NAMESPACE", "dreamline"),
        # What every step process or pod sees, besides its argv.
        step_env={"DREAMLINE_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri,
                  "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"},
    )


DEPLOYMENT = from_environment()
