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
| DREAMLINE_MLFLOW_UI_URL | MLFLOW_TRACKING_URI when it is http(s) | MLflow as a reviewer's browser reaches it (approval pages link its images) |
| DREAMLINE_GPU_HOUR_PRICE | 2.5 | price of one GPU-hour (your cloud's, in your currency): the estimated price of a night |
| DREAMLINE_GPU_SLOTS | 1 | the `gpu` pool's size: GPU steps at once; the checkpoint evaluations are shared out over as many processes |
| DREAMLINE_GPU_DEVICES | (none) | local mode: the GPUs GPU steps share out, one each (`0,1,2,3`; the launcher sets it) |
| DREAMLINE_RETRY_DELAY | 60 | seconds before a crashed step's first retry (doubling for the next, at most 15 min) |
| DREAMLINE_SCREEN | nudenet | the screen of training photos and generated images (docs/safety.md): nudenet, off, or a `FILE.py:NAME` / `module:NAME` of your own |

Kubernetes only (see docs/deployment.md for the objects they name):

| variable | default | meaning |
| --- | --- | --- |
| DREAMLINE_IMAGE | dreamline-worker:latest | the `worker` image the step pods run |
| DREAMLINE_NAMESPACE | dreamline | namespace of the step pods |
| DREAMLINE_SERVICE_ACCOUNT | dreamline-worker | service account of the step pods (cloud IAM binds to it) |
| DREAMLINE_IMAGE_PULL_POLICY | IfNotPresent | Always, IfNotPresent or Never |
| DREAMLINE_IMAGE_PULL_SECRETS | (none) | comma-separated Secret names for a private registry |
| DREAMLINE_CONFIGMAP | dreamline-config | ConfigMap of the pods' non-secret settings (S3 endpoint, region) |
| DREAMLINE_S3_SECRET | dreamline-s3 | Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; empty: a cloud role |
| DREAMLINE_MLFLOW_SECRET | dreamline-mlflow | optional Secret with MLFLOW_TRACKING_USERNAME/PASSWORD (or _TOKEN) |
| DREAMLINE_HF_SECRET | dreamline-hf | optional Secret with HF_TOKEN, for gated models |
| DREAMLINE_GIT_SECRET | dreamline-git | optional Secret with GIT_CONFIG_* credentials for a private data registry |
| DREAMLINE_MODEL_CACHE_PVC | dreamline-model-cache | PVC mounted at /models as the Hugging Face cache; empty: none |

In kubernetes mode a setting that cannot work from a pod (a local path, a sqlite tracking store, credentials
written into a URI) fails DAG parsing with one line naming it: `Deployment.check`.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The production models: what a setting left unset means, here and in the embedded deployment's `hub` model set.
HUB_MODELS = {"DREAMLINE_BASE_MODEL": "stabilityai/stable-diffusion-xl-base-1.0",
              "DREAMLINE_CLIP_MODEL": "openai/clip-vit-large-patch14", "DREAMLINE_DINO_MODEL": "facebook/dino-vits16",
              "DREAMLINE_CAPTION_MODEL": "Salesforce/blip-image-captioning-large"}
MODEL_CACHE_MOUNT = "/models"  # where the model-cache PVC is mounted in step pods; HF_HOME lies under it


class DeploymentError(ValueError):
    """A deployment setting that cannot work; the message is one line that names the setting."""


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
    mlflow_ui_url: str | None
    image: str
    namespace: str
    service_account: str = "dreamline-worker"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    configmap: str = "dreamline-config"
    s3_secret: str = "dreamline-s3"
    optional_secrets: tuple[str, ...] = ("dreamline-mlflow", "dreamline-hf", "dreamline-git")
    model_cache_pvc: str = "dreamline-model-cache"
    gpu_hour_price: float = 2.5
    gpu_slots: int = 1
    gpu_devices: tuple[str, ...] = ()
    retry_delay: float = 60.0
    screen: str = "nudenet"
    step_env: dict = field(default_factory=dict)
    incoming: str = ""  # the one folder `publish_dataset` publishes from (DREAMLINE_INCOMING)

    def cache_dir(self, name: str) -> str:
        return f"{self.cache.rstrip('/')}/{name}"

    def incoming_folder(self, name: str) -> str:
        """The folder `name` inside the incoming folder, symbolic links resolved, or DeploymentError: the
        `publish_dataset` form names a folder there, never any folder the worker can read (~/.ssh, the stack's
        state), which publishing would copy into the data registry."""
        root = os.path.realpath(self.incoming)
        folder = os.path.realpath(os.path.join(root, name))
        if os.path.isabs(name) or folder == root or os.path.commonpath([root, folder]) != root:
            raise DeploymentError(f"source {name!r}: not a folder inside the incoming folder {self.incoming} "
                                  f"(DREAMLINE_INCOMING); put the photos there and name their folder")
        if not os.path.isdir(folder):
            raise DeploymentError(f"source {name!r}: no such folder in {self.incoming} (DREAMLINE_INCOMING)")
        return folder

    def run_dir(self, dag_id: str, run_id: str) -> str:
        """The one folder (URI) that holds everything a pipeline run writes."""
        return f"{self.storage.rstrip('/')}/{dag_id}/{run_folder(run_id)}"

    def check(self) -> None:
        """Refuse, in one line naming the setting, what a step pod could not use."""
        if self.executor not in ("local", "kubernetes"):
            raise DeploymentError(f"DREAMLINE_EXECUTOR={self.executor!r}: use local or kubernetes")
        for name, value in self.models().items():
            if not is_model_reference(value):
                raise DeploymentError(f"{name}={value}: neither a Hugging Face id (org/name) nor an absolute path to "
                                      f"a folder (a relative path would mean another folder in every working folder)")
        if self.executor != "kubernetes":
            return
        if self.screen.partition(":")[0].endswith(".py"):
            raise DeploymentError(f"DREAMLINE_SCREEN={self.screen}: a file on this machine; in kubernetes mode name "
                                  f"a module:NAME installed in the worker image")
        for name, value in (("DREAMLINE_STORAGE", self.storage), ("DREAMLINE_CACHE", self.cache)):
            if not is_remote_uri(value):
                raise DeploymentError(f"{name}={value}: in kubernetes mode it must be a remote URI (s3://bucket/"
                                      f"prefix): a pod's local disk is gone when the pod ends")
        if not is_remote_git(self.dataset_repo):
            raise DeploymentError(f"DREAMLINE_DATASET_REPO={self.dataset_repo}: in kubernetes mode it must be a "
                                  f"Git URL the pods can clone (https://, ssh:// or git@host:path)")
        if re.match(r"https?://[^/]*@", self.dataset_repo):  # it would show in the form, pod specs and logs
            raise DeploymentError("DREAMLINE_DATASET_REPO: holds credentials; put them in the Secret named by "
                                  "DREAMLINE_GIT_SECRET (GIT_CONFIG_* with an http.extraHeader)")
        if "@sha256:" not in self.image and (":" not in self.image.rsplit("/", 1)[-1]
                                             or self.image.endswith(":latest")):
            raise DeploymentError(f"DREAMLINE_IMAGE={self.image}: pin the worker image by tag or digest, so that "
                                  f"the pods run the code this DAG was deployed with")
        if not re.match(r"https?://", self.tracking_uri):
            raise DeploymentError(f"MLFLOW_TRACKING_URI={self.tracking_uri}: in kubernetes mode it must be an "
                                  f"MLflow tracking server (http(s)://host:port), not a file or database")
        if re.match(r"https?://[^/]*@", self.tracking_uri):
            raise DeploymentError("MLFLOW_TRACKING_URI: holds credentials; put them in the Secret named by "
                                  "DREAMLINE_MLFLOW_SECRET (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)")
        for name, value in self.models().items():
            if not pod_can_read_model(value):
                raise DeploymentError(f"{name}={value}: a path on this machine; in kubernetes mode use a Hugging "
                                      f"Face id or a folder under {MODEL_CACHE_MOUNT} (the model-cache volume)")


    def models(self) -> dict[str, str]:
        return {"DREAMLINE_BASE_MODEL": self.base_model, "DREAMLINE_CLIP_MODEL": self.clip_model,
                "DREAMLINE_DINO_MODEL": self.dino_model, "DREAMLINE_CAPTION_MODEL": self.caption_model}


def slug(text: str) -> str:
    """A folder name for any text (a run id comes from whoever triggers): never empty, `.`, `..` or hidden."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return re.sub(r"^\.", "_", name) or "_"


def run_folder(run_id: str) -> str:
    """A run's folder name: readable (its slug, cut short) and one per run id (a hash of the exact id), since the
    slug alone maps `...+00:00` and `...-00:00`, or ids differing only in dropped characters, to one folder."""
    return f"{slug(run_id)[:64]}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def is_remote_uri(uri: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*://", uri)) and not uri.startswith("file://")


def is_remote_git(url: str) -> bool:
    return bool(re.match(r"(https?|ssh|git)://", url) or re.match(r"[\w.-]+@[\w.-]+:", url))


def is_model_reference(model: str) -> bool:
    """An absolute folder, or a hub id `[org/]name[@revision]` (sd_tasks.models.model_refs.parse, which the steps apply)."""
    return model.startswith("/") or bool(re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(@[\w./-]+)?",
                                                        model))


def pod_can_read_model(model: str) -> bool:
    """A hub id (`org/name`) or a path under the model-cache mount."""
    if model.startswith(MODEL_CACHE_MOUNT + "/"):
        return True
    return not model.startswith(("/", ".", "~", "file:")) and model.count("/") <= 1


def _price(value: str) -> float:
    try:
        price = float(value)
    except ValueError:
        price = -1.0
    if not price >= 0:  # also NaN
        raise DeploymentError(f"DREAMLINE_GPU_HOUR_PRICE={value!r}: a price, a number of at least 0")
    return price


def _screen(value: str) -> str:
    """nudenet, off, or FILE.py:NAME / module:NAME (sd_tasks.safety.screening loads it in the step)."""
    if value not in ("nudenet", "off") and not re.fullmatch(r"[^:\s]+:[A-Za-z_]\w*", value):
        raise DeploymentError(f"DREAMLINE_SCREEN={value!r}: use nudenet, off, or FILE.py:NAME / module:NAME of "
                              f"a screen of your own")
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise DeploymentError(f"DREAMLINE_RETRY_DELAY={value!r}: seconds before a retry, from 0 to 86400")
    return seconds


def _slots(value: str) -> int:
    if not (value.strip().isdigit() and int(value) >= 1):
        raise DeploymentError(f"DREAMLINE_GPU_SLOTS={value!r}: a whole number of GPU slots, at least 1")
    return int(value)


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def from_environment(env=os.environ) -> Deployment:
    home = Path(env.get("DREAMLINE_HOME", REPO_ROOT / ".dreamline")).resolve()
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return Deployment(
        home=home,
        executor=env.get("DREAMLINE_EXECUTOR", "local"),
        storage=env.get("DREAMLINE_STORAGE", str(home / "runs")),
        incoming=env.get("DREAMLINE_INCOMING", str(home / "incoming")),
        cache=env.get("DREAMLINE_CACHE", str(home / "cache")),
        dataset_repo=env.get("DREAMLINE_DATASET_REPO", str(home / "data-registry")),
        base_model=env.get("DREAMLINE_BASE_MODEL") or HUB_MODELS["DREAMLINE_BASE_MODEL"],
        clip_model=env.get("DREAMLINE_CLIP_MODEL") or HUB_MODELS["DREAMLINE_CLIP_MODEL"],
        dino_model=env.get("DREAMLINE_DINO_MODEL") or HUB_MODELS["DREAMLINE_DINO_MODEL"],
        caption_model=env.get("DREAMLINE_CAPTION_MODEL") or HUB_MODELS["DREAMLINE_CAPTION_MODEL"],
        tracking_uri=tracking_uri,
        mlflow_ui_url=env.get("DREAMLINE_MLFLOW_UI_URL") or (tracking_uri if tracking_uri.startswith("http") else None),
        image=env.get("DREAMLINE_IMAGE", "dreamline-worker:latest"),
        namespace=env.get("DREAMLINE_NAMESPACE", "dreamline"),
        service_account=env.get("DREAMLINE_SERVICE_ACCOUNT", "dreamline-worker"),
        image_pull_policy=env.get("DREAMLINE_IMAGE_PULL_POLICY", "IfNotPresent"),
        image_pull_secrets=_names(env.get("DREAMLINE_IMAGE_PULL_SECRETS")),
        configmap=env.get("DREAMLINE_CONFIGMAP", "dreamline-config"),
        s3_secret=env.get("DREAMLINE_S3_SECRET", "dreamline-s3"),
        optional_secrets=tuple(n for n in (env.get("DREAMLINE_MLFLOW_SECRET", "dreamline-mlflow"),
                                           env.get("DREAMLINE_HF_SECRET", "dreamline-hf"),
                                           env.get("DREAMLINE_GIT_SECRET", "dreamline-git")) if n),
        model_cache_pvc=env.get("DREAMLINE_MODEL_CACHE_PVC", "dreamline-model-cache"),
        gpu_hour_price=_price(env.get("DREAMLINE_GPU_HOUR_PRICE", "2.5")),
        gpu_slots=_slots(env.get("DREAMLINE_GPU_SLOTS") or "1"),
        gpu_devices=_names(env.get("DREAMLINE_GPU_DEVICES")),
        retry_delay=_seconds(env.get("DREAMLINE_RETRY_DELAY", "60")),
        screen=_screen(env.get("DREAMLINE_SCREEN") or "nudenet"),
        # What every local step process sees, besides its argv (pods: see operators.pod_environment).
        step_env={"DREAMLINE_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri,
                  "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"},
    )


DEPLOYMENT = from_environment()
