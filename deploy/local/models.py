"""The models a local deployment runs (`make demo`, `make ui`, `make stack`, `make subject`), and the GPUs it runs
them on.

DREAMLINE_MODELS picks a set; DREAMLINE_BASE_MODEL, DREAMLINE_CLIP_MODEL and DREAMLINE_DINO_MODEL override one
model each:

    tiny   (default) random-weight SDXL-architecture models and evaluators, built offline by `sd_tasks tiny-model`
           into <models folder>/ (and nowhere else); CPU-sized, for trying the pipeline and for CI
    hub    the production models (plugins/dreamline/deployment.py HUB_MODELS): fetched from the Hugging Face Hub, or
           the mirror HF_ENDPOINT names (HF_TOKEN for gated ones), into the model cache once, pinned to a commit by
           every run; they need a CUDA GPU (DREAMLINE_DEVICE=cpu runs them on the CPU anyway, for hours a step)

With hub models the `gpu` pool gets one slot per GPU (unless DREAMLINE_GPU_SLOTS says otherwise) and each GPU step
one GPU of its own (DREAMLINE_GPU_DEVICES, plugins/dreamline/gpus.py). Every refusal is one line naming the
setting (ValueError).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy.local.settings import REPO

SETS = ("tiny", "hub")
SETTINGS = ("DREAMLINE_BASE_MODEL", "DREAMLINE_CLIP_MODEL", "DREAMLINE_DINO_MODEL")


def deployment():
    """plugins/dreamline/deployment.py, which says what the production models are and what a model setting may be."""
    plugins = str(REPO / "plugins")
    if plugins not in sys.path:
        sys.path.append(plugins)
    from dreamline import deployment

    return deployment


def hub_models() -> dict[str, str]:
    return {k: deployment().HUB_MODELS[k] for k in SETTINGS}


def tiny_models(folder: Path) -> dict[str, str]:
    """Where `sd_tasks tiny-model` builds the tiny pipeline and evaluators under a models folder."""
    return {"DREAMLINE_BASE_MODEL": str(folder / "tiny-sdxl"),
            "DREAMLINE_CLIP_MODEL": str(folder / "evaluators" / "clip"),
            "DREAMLINE_DINO_MODEL": str(folder / "evaluators" / "dino")}


def chosen(environ, folder: Path, cwd: Path) -> dict[str, str]:
    """The three model settings: the set DREAMLINE_MODELS names, each overridden by its own variable. A value
    that is neither an absolute folder nor a hub id, or a hub id that is also a folder under `cwd` (where the user
    probably meant the folder), is refused."""
    name = environ.get("DREAMLINE_MODELS") or "tiny"
    if name not in SETS:
        raise ValueError(f"DREAMLINE_MODELS={name!r}: choose tiny (random weights, offline, any machine) or hub (the "
                         f"real models from the Hugging Face Hub, on a CUDA GPU)")
    models = {**(tiny_models(folder) if name == "tiny" else hub_models()),
              **{k: environ[k] for k in SETTINGS if environ.get(k)}}
    for setting, value in models.items():
        if value.startswith("/"):
            continue
        if not deployment().is_model_reference(value):
            raise ValueError(f"{setting}={value}: neither a Hugging Face id (org/name) nor an absolute path to a "
                             f"folder")
        if (cwd / value.partition("@")[0]).is_dir():
            raise ValueError(f"{setting}={value}: a folder of that name is in {cwd}, and a Hugging Face id looks the "
                             f"same; give the folder as an absolute path ({cwd / value}), or move it to mean the id")
    return models


def from_hub(models: dict[str, str]) -> list[str]:
    """The settings that name a Hugging Face id (the others are folders on this machine)."""
    return [k for k, v in models.items() if not v.startswith("/")]


def needs_gpu(models: dict[str, str]) -> bool:
    """Whether the base model is SDXL at its real size: a hub id, or a local pipeline with an SDXL-sized UNet. The
    tiny models (a UNet of 32 and 64 channels, or not built yet where their defaults point) run on a CPU."""
    base = models["DREAMLINE_BASE_MODEL"]
    if not base.startswith("/"):
        return True
    try:
        channels = json.loads((Path(base) / "unet" / "config.json").read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not there yet (the tiny models are built on first use), or not a pipeline: its run says so
    return max(channels) >= 320  # SDXL's UNet: 320, 640, 1280


def environment(models: dict[str, str]) -> dict[str, str]:
    """The variables the deployment's processes get: the models, and HF_HUB_OFFLINE=1 when none comes from the hub
    (nothing asks it; a stray request fails at once instead of waiting on a network that may be closed)."""
    return {**models, **({} if from_hub(models) else {"HF_HUB_OFFLINE": "1"})}


def ensure_tiny(models: dict[str, str], folder: Path, env: dict[str, str], log: Path) -> bool:
    """Build the tiny models where the settings point into `folder` and nothing is there yet; True if it built.
    A setting pointing elsewhere is never built: a hub id is fetched by the runs, a folder is the user's own."""
    tiny = tiny_models(folder)
    wanted = [k for k in SETTINGS if models[k] == tiny[k] and not (Path(tiny[k]) / "config.json").exists()
              and not (Path(tiny[k]) / "model_index.json").exists()]
    if not wanted:
        return False
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.run([sys.executable, "-m", "sd_tasks", "tiny-model", tiny["DREAMLINE_BASE_MODEL"],
                               "--evaluators", str(folder / "evaluators")], cwd=folder.parent,
                              env={**env, "PYTHONPATH": str(REPO)}, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"sd_tasks tiny-model failed with status {proc.returncode}; see {log}")
    return True


def gpu_devices(environ=os.environ) -> list[str]:
    """The CUDA devices this machine offers to the steps: CUDA_VISIBLE_DEVICES when set, else what torch counts."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, env=dict(environ), stdin=subprocess.DEVNULL)
    count = int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0
    return [str(i) for i in range(count)]


def gpu_environment(models: dict[str, str], environ=os.environ) -> dict[str, str]:
    """With a base model that needs a GPU: the devices GPU steps share out and the `gpu` pool's size (one slot per
    GPU, unless DREAMLINE_GPU_SLOTS is set); a machine without CUDA is refused in one line, unless
    DREAMLINE_DEVICE=cpu. Nothing with the tiny models: every step runs on the CPU."""
    if not needs_gpu(models):
        return {}
    devices = gpu_devices(environ)
    if not devices:
        if environ.get("DREAMLINE_DEVICE") == "cpu":
            return {}
        raise ValueError(f"DREAMLINE_BASE_MODEL={models['DREAMLINE_BASE_MODEL']}: SDXL needs a CUDA GPU and this "
                         f"machine has none that PyTorch can use; choose the tiny models (DREAMLINE_MODELS=tiny), or "
                         f"set DREAMLINE_DEVICE=cpu to run on the CPU anyway (hours per step)")
    return {"DREAMLINE_GPU_DEVICES": ",".join(devices),
            "DREAMLINE_GPU_SLOTS": environ.get("DREAMLINE_GPU_SLOTS") or str(len(devices))}


def prepare(models: dict[str, str], folder: Path, env: dict[str, str], scratch: Path) -> dict[str, str]:
    """The models ready to run: tiny ones built where the settings point at their defaults, the others fetched
    into the model cache and pinned. Returns what each setting loads (an absolute folder or `id@sha`)."""
    ensure_tiny(models, folder, env, folder / "tiny-model.log")
    if not from_hub(models):
        return models
    scratch.mkdir(parents=True, exist_ok=True)
    return pin(models, env, cwd=scratch)


def pin(models: dict[str, str], env: dict[str, str], cwd: Path) -> dict[str, str]:
    """Fetch the hub models into the model cache now (`sd_tasks pin-models`, as each run's first step does), so a
    first night does not spend its first hour downloading and a wrong id or an unreachable hub is said here, in one
    line. Returns what each was pinned to."""
    argv = [sys.executable, "-m", "sd_tasks", "pin-models",
            *[f"--{k.removeprefix('DREAMLINE_').lower().replace('_', '-')}={v}" for k, v in models.items()]]
    proc = subprocess.run(argv, env={**env, "PYTHONPATH": str(REPO)}, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        raise ValueError(errors[-1].removeprefix("error: ") if errors else proc.stderr.strip()[-2000:])
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])
