"""Model references: a local folder, or a Hugging Face Hub model pinned to one commit (`id@sha`).

A run resolves every hub model it uses to a commit once, at its start (step `pin-models`), fetches that commit's
files into the model cache (HF_HOME) and hands `id@sha` to every later step. So the encode and class-image caches,
the lineage, the MLflow tags and the registered version all name the weights that ran; a new commit upstream reads
as a changed model; and the steps load from the cache without asking the hub.

    /abs/folder        a local diffusers or transformers folder, used as it is (the tiny offline models); also
                       ./x, ~/x and x/y/z (which cannot be hub ids), from the working folder (dvc.yaml's stages)
    org/name           a hub model at the commit its `main` branch points to now
    org/name@rev       a hub model at a branch, tag or commit

`org/name` always means the hub: steps load hub models from the cache's snapshot folder, and the DAG's steps run in
a scratch folder, so a folder of that name in the checkout never stands in for the real model; run by hand where
such a folder exists, a step refuses the id in one line rather than guess which was meant.

When the hub cannot be reached, a commit resolved before (the cache's `refs/`) is used, as huggingface_hub's own
`resolve_revision` does, so a warm cache runs offline (HF_HUB_OFFLINE=1 too); with nothing cached, one line says
what is missing. Only the files the steps load are fetched (`allow_patterns`): not SDXL's 7 GB single-file
checkpoints, fp16 variants, ONNX, OpenVINO, Flax or TensorFlow weights.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError, Unavailable

COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
# What `from_pretrained` reads of a diffusers pipeline (one folder per component) or of a single model, without a
# variant: configs, tokenizers and fp32 safetensors (pytorch_model.bin only where a repository has no safetensors).
PIPELINE = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*",
            "*/model.safetensors", "*/diffusion_pytorch_model.safetensors"]
MODEL = ["*.json", "*.txt", "model.safetensors", "diffusion_pytorch_model.safetensors"]
WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a local `folder`, or a hub `repo_id` at `revision` (None: the default branch)."""

    text: str
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def pinned(self) -> bool:
        return self.folder is not None or bool(self.revision and COMMIT.fullmatch(self.revision))


def parse(ref: str, setting: str = "model") -> ModelRef:
    """A reference as written: a folder (absolute, or relative to the working folder when it cannot be a hub id:
    `./x`, `~/x`, `a/b/c`), or a hub id. StepError naming `setting` for a hub id that is also a folder here (which
    one was meant?) and for what is neither."""
    text = ref.strip()
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 and "@" not in text:
        return ModelRef(text, folder=Path(text).expanduser().absolute())
    repo_id, at, revision = text.partition("@")
    if not HUB_ID.fullmatch(repo_id) or (at and not revision):
        raise StepError(f"{setting} {ref}: neither a Hugging Face id (org/name, optionally @revision) nor a path to "
                        f"a local folder")
    if Path(repo_id).is_dir():
        raise StepError(f"{setting} {ref}: a Hugging Face id, and a folder of that name is in {Path.cwd()}: write "
                        f"the folder as ./{repo_id} (or its absolute path), or run elsewhere to mean the id")
    return ModelRef(text, repo_id=repo_id, revision=revision or None)


@dataclass
class PinModelsConfig:
    """Resolve every model a run uses to one commit (`id@sha`) and fetch its files into the model cache (HF_HOME)."""

    base_model: str | None = option("SDXL pipeline: hub id[@revision] or absolute path of a local folder", None)
    clip_model: str | None = option("CLIP evaluator (evaluate's --clip-model)", None)
    dino_model: str | None = option("DINO evaluator (evaluate's --dino-model)", None)
    vae: str | None = option("VAE decoding evaluation and class images instead of the base model's", None)
    caption_model: str | None = option("captioning model (caption's --strategy model)", None)
    refiner_model: str | None = option("SDXL refiner (evaluate's --refiner-model)", None)
    output: str | None = option("URI to write models.json to (what was asked for and what it was pinned to)", None)


def run(config: PinModelsConfig) -> dict:
    asked = {role: ref for role, ref in asdict(config).items() if role != "output" and ref}
    for role, ref in asked.items():  # every reference checked before the first download
        parse(ref, f"--{role.replace('_', '-')}")
    pinned = {role: pin(ref, f"--{role.replace('_', '-')}") for role, ref in asked.items()}
    if config.output:
        from sd_tasks.core.storage import write_dir, write_json

        with write_dir(config.output) as out:
            write_json(out / "models.json", {role: {"asked": asked[role], "pinned": pinned[role]} for role in asked})
    return pinned


def pin(ref: str, setting: str = "model") -> str:
    """`ref` at one commit, `id@sha` (a local folder as it is), with that commit's files in the model cache."""
    model = parse(ref, setting)
    if model.folder is not None:
        if not model.folder.is_dir():
            raise StepError(f"{setting} {ref}: no such folder")
        return str(model.folder)
    commit = resolve(model, setting)
    fetch(model.repo_id, commit, setting)
    return f"{model.repo_id}@{commit}"


def local_folder(ref: str, setting: str = "model") -> str:
    """The folder to load `ref` from: a local folder, or the cache's snapshot of its commit (fetched if missing, as
    a step pod without the model-cache volume needs). Loaders pass this to `from_pretrained`, never the id."""
    model = parse(ref, setting)
    if model.folder is not None:
        return str(model.folder)
    commit = model.revision if model.pinned else resolve(model, setting)
    return str(snapshot_folder(model.repo_id, commit) or fetch(model.repo_id, commit, setting))


def resolve(model: ModelRef, setting: str) -> str:
    """The commit `model.revision` points to on the hub now, or the one cached when the hub cannot be reached."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError, RevisionResolutionError)

    try:
        return HfApi().resolve_revision(model.repo_id, revision=model.revision).resolved
    except GatedRepoError:
        raise StepError(f"{setting} {model.text}: a gated model: accept its terms on the hub and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise StepError(f"{setting} {model.text}: no such model on {constants.ENDPOINT} (or a private one: set "
                        f"HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise StepError(f"{setting} {model.text}: no revision {model.revision!r} on {constants.ENDPOINT}") from None
    except RevisionResolutionError as exc:
        raise _not_cached(model.text, setting, exc) from None
    except HfHubHTTPError as exc:  # 401/403: a token the hub refused
        raise StepError(f"{setting} {model.text}: {constants.ENDPOINT} refused it ({_first_line(exc)}); check "
                        f"HF_TOKEN") from None


def fetch(repo_id: str, commit: str, setting: str) -> Path:
    """The commit's files the steps load, into the model cache (what is there already is not fetched again)."""
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    shown = f"{repo_id}@{commit}"
    cached = snapshot_folder(repo_id, commit)
    try:
        if cached is not None and has_weights(cached):  # a complete snapshot needs no listing from the hub
            files = {p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()}
        else:
            files = set(HfApi().list_repo_files(repo_id, revision=commit))
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=allow_patterns(files)))
    except HfHubHTTPError as exc:  # the hub answered with an error mid-way (it resolved the commit just before)
        raise Unavailable(f"{setting} {shown}: fetching it failed ({_first_line(exc)})") from None
    except (LocalEntryNotFoundError, ConnectionError, httpx2.TransportError) as exc:
        raise _not_cached(shown, setting, exc) from None
    except OSError as exc:  # a full disk, a cache folder it may not write
        raise Unavailable(f"{setting} {shown}: writing it into {cached or 'the model cache'} failed "
                          f"({exc.strerror or exc})") from None
    if not has_weights(folder):
        raise StepError(f"{setting} {shown}: the repository holds no weights the steps can load ({', '.join(WEIGHTS)})")
    return folder


def allow_patterns(files: set[str]) -> list[str]:
    """What to fetch of a repository, given the names of its files."""
    if "model_index.json" in files:  # a diffusers pipeline, one folder per component
        return PIPELINE
    if any(Path(f).name in WEIGHTS[:2] for f in files):
        return MODEL
    return MODEL + ["pytorch_model.bin"]  # an older repository without safetensors


def has_weights(folder: Path) -> bool:
    return any(p.name in WEIGHTS for p in folder.rglob("*"))


def snapshot_folder(repo_id: str, commit: str) -> Path | None:
    """The cache's folder of that commit, if a fetch made it."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    return folder if folder.is_dir() else None


def _not_cached(shown: str, setting: str, exc: Exception) -> Exception:
    """Nothing usable in the cache and the hub not asked: final offline (a retry cannot help), else retried."""
    from huggingface_hub import constants

    where = f"the model cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return StepError(f"{setting} {shown}: not in {where}, and HF_HUB_OFFLINE=1 forbids fetching it: fetch it once "
                         f"with the hub reachable (unset HF_HUB_OFFLINE)")
    cause = exc.__cause__ or exc
    return Unavailable(f"{setting} {shown}: not in {where}, and {constants.ENDPOINT} could not be reached "
                       f"({type(cause).__name__}: {_first_line(cause)})")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
