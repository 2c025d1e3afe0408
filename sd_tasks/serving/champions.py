"""Which LoRA serves a subject: the version its alias (`champion`) names in the MLflow registry, followed as it moves.

The registry is the source of truth. A subject's model is `<subject>-sdxl-lora` (the DAG's naming); its alias is
looked up again once it is older than `refresh_seconds`, so `promote` and `rollback` reach every server within that
time, with no call to the servers and nothing to miss; while the registry cannot be reached, a subject keeps the
version it last resolved to. A version is served only when it may be and is whole: its consent record, if it was
trained under one (sd_tasks.data.consent), covers serving today; not marked `score.broken`; its LoRA file's header
a LoRA's (sd_tasks.training.lora_files), its file downloaded completely into the adapter folder (a temp folder
renamed into place: a request never sees half a file). Adapters are kept on disk by (model, version); the instance
words (`sks dog`) come from the version's own tags, as it was trained.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError, Unavailable
from sd_tasks.data.consent import tags_refusal
from sd_tasks.training import lora_files
from sd_tasks.training.checkpoint_files import LORA_WEIGHTS

SUBJECT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


MODEL_SUFFIX = "-sdxl-lora"


def model_name(subject: str) -> str:
    """The registered model of a subject, as the DAG names it (dreamline.subjects.Subject.model_name)."""
    return subject + MODEL_SUFFIX


class NotServable(Exception):
    """A subject the server cannot answer for; `status` is the HTTP status (404 unknown, 409 no usable version, 503
    the registry unreachable with nothing resolved before)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Served:
    """One version of one subject's LoRA, ready to load."""

    subject: str
    model: str
    version: int
    alias: str
    base_model: str
    instance: str | None  # "sks dog": what {instance} becomes; None for a version registered without it
    lora: Path | None  # the folder holding LORA_WEIGHTS; None where the replica that renders downloads it (Ray)


class Champions:
    """Each subject's served version, its alias looked up at most every `refresh_seconds`; with `adapters` None the
    LoRA is not downloaded here (Ray: each replica downloads what it renders, `download`)."""

    def __init__(self, adapters: Path | None, alias: str = "champion", refresh_seconds: float = 5.0):
        self.adapters, self.alias, self.refresh = adapters and Path(adapters), alias, refresh_seconds
        self._resolved: dict[str, tuple[float, Served]] = {}
        self._lock = threading.Lock()

    def served(self, subject: str) -> Served:
        if not SUBJECT.fullmatch(subject):
            raise NotServable(404, f"subject {subject!r}: not a subject name")
        with self._lock:
            cached = self._resolved.get(subject)
            if cached and time.monotonic() - cached[0] < self.refresh:
                return cached[1]
        try:
            served = self._resolve(subject)
        except Unavailable as exc:
            if cached:  # the registry is down: what it said last stands until it answers again
                return cached[1]
            raise NotServable(503, f"subject {subject!r}: the model registry cannot be reached ({exc})") from None
        with self._lock:
            self._resolved[subject] = (time.monotonic(), served)
        return served

    def subjects(self) -> list[dict]:
        """Every registered subject model, with the version its alias names (None when it names none)."""
        from mlflow.exceptions import MlflowException

        try:
            models = tracking.client().search_registered_models(max_results=1000)
        except MlflowException as exc:
            raise NotServable(503, f"the model registry cannot be reached ({str(exc).splitlines()[0][:200]})") from None
        found = []
        for model in models:
            if model.name.endswith(MODEL_SUFFIX):
                version = model.aliases.get(self.alias)
                found.append({"subject": model.name.removesuffix(MODEL_SUFFIX), "model": model.name,
                              "alias": self.alias, "version": int(version) if version is not None else None})
        return sorted(found, key=lambda s: s["subject"])

    def _resolve(self, subject: str) -> Served:
        name = model_name(subject)
        version = tracking.version_by_alias(tracking.client(), name, self.alias)
        if version is None:
            if not self._registered(name):
                raise NotServable(404, f"subject {subject!r}: no registered model {name}")
            raise NotServable(409, f"subject {subject!r}: {name} has no {self.alias!r} version yet")
        tags = version.tags
        if reason := tags_refusal(tags, "serving", date.today()):
            raise NotServable(409, f"{name} version {version.version} ({self.alias}): {reason}; not served")
        if tags.get("score.broken") == "true":
            raise NotServable(409, f"{name} version {version.version} ({self.alias}): its evaluation produced broken "
                                   f"images; never served")
        folder = download(self.adapters, name, int(version.version)) if self.adapters else None
        return Served(subject, name, int(version.version), self.alias, tags.get("base_model", ""),
                      tags.get("instance") or None, folder)

    @staticmethod
    def _registered(name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            tracking.client().get_registered_model(name)
            return True
        except MlflowException:
            return False


def download(adapters: Path, name: str, version: int) -> Path:
    """The version's LoRA in the adapter folder, downloaded and checked once; whole or absent."""
    import mlflow

    folder = Path(adapters) / name / str(version)
    if (folder / LORA_WEIGHTS).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        weights = next(downloaded.rglob("*.safetensors"), None)
        shown = f"models:/{name}/{version}"
        if weights is None:
            raise NotServable(409, f"{shown}: no LoRA weights in the registered model")
        try:
            lora_files.check(weights, f"{shown} ({weights.name})")
        except StepError as exc:
            raise NotServable(409, f"{exc}; never served") from None
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        shutil.move(str(weights), staged / LORA_WEIGHTS)
        try:
            staged.rename(folder)  # atomic: another request sees the whole folder or none
        except OSError:  # another request got there first: its folder is as good
            pass
    return folder
