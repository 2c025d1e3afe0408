"""Model references (sd_tasks/models/model_refs.py) against a hub: the tiny models served under the real ids by a local
fake hub (tests/fake_hub.py), through the step CLI, as a run's `models` task runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fake_hub import REAL_IDS, UNUSED, FakeHub, folder_files

SDXL, CLIP, DINO = REAL_IDS["sdxl"], REAL_IDS["clip"], REAL_IDS["dino"]


@pytest.fixture
def hub(models):
    hub = FakeHub()
    hub.shas = {REAL_IDS[k]: hub.publish(REAL_IDS[k], folder_files(models[k], UNUSED["pipeline" if k == "sdxl" else
                                                                                        "model"]))
                for k in REAL_IDS}
    yield hub
    hub.stop()


def step_env(hub: FakeHub, hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": str(REPO), **extra}


def pin(env: dict, *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_tasks", "pin-models", *flags], env=env, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pinning_fetches_what_the_steps_load_once_then_the_steps_run_without_the_hub(hub, tmp_path):
    env = step_env(hub, tmp_path / "hf")
    flags = [f"--base-model={SDXL}", f"--clip-model={CLIP}", f"--dino-model={DINO}", f"--output={tmp_path / 'out'}"]
    pinned = result(pin(env, *flags))
    assert pinned == {"base_model": f"{SDXL}@{hub.shas[SDXL]}", "clip_model": f"{CLIP}@{hub.shas[CLIP]}",
                      "dino_model": f"{DINO}@{hub.shas[DINO]}"}
    written = json.loads((tmp_path / "out" / "models.json").read_text())
    assert written["base_model"] == {"asked": SDXL, "pinned": pinned["base_model"]}
    fetched = set(hub.downloads)
    assert fetched and not {f for f in fetched if f.split("/", 2)[2] in UNUSED["pipeline"] + UNUSED["model"]}
    assert f"{SDXL}/unet/diffusion_pytorch_model.safetensors" in fetched

    hub.downloads.clear()
    assert result(pin(env, *flags)) == pinned and hub.downloads == []  # a warm cache: nothing fetched again

    hub.stop()  # every step after `models` loads from the cache: the hub is never asked
    load = ("import sys; from sd_tasks.evaluation import metrics; from sd_tasks.models import loading as models; "
            "base, clip, dino = sys.argv[1:]; "
            "models.load_unet(base); models.load_text_encoders(base); "
            "assert models.load_pipeline(base, 'float32').vae.use_slicing; "  # decodes an image at a time
            "metrics.ClipEmbedder(clip); metrics.DinoEmbedder(dino); "
            "from sd_tasks.training.lora_files import base_layers; assert base_layers(base)")
    proc = subprocess.run([sys.executable, "-c", load, *pinned.values()], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and pinning itself runs offline on the warm cache, with the hub down or HF_HUB_OFFLINE=1
    assert result(pin(env, *flags)) == pinned
    assert result(pin({**env, "HF_HUB_OFFLINE": "1"}, *flags)) == pinned


def test_a_new_commit_upstream_is_pinned_and_fetched(hub, models, tmp_path):
    env = step_env(hub, tmp_path / "hf")
    first = result(pin(env, f"--base-model={SDXL}"))["base_model"]
    files = folder_files(models["sdxl"])
    files["scheduler/scheduler_config.json"] = files["scheduler/scheduler_config.json"].replace(b"{", b'{"x": 1, ', 1)
    moved = hub.publish(SDXL, files)
    hub.downloads.clear()
    second = result(pin(env, f"--base-model={SDXL}"))["base_model"]
    assert first != second == f"{SDXL}@{moved}"
    assert f"{SDXL}/scheduler/scheduler_config.json" in hub.downloads
    # an explicit revision pins that commit, whatever main says
    assert result(pin(env, f"--base-model={first}"))["base_model"] == first


def test_a_hub_that_cannot_be_reached_fails_in_one_line_unless_the_cache_has_the_model(hub, tmp_path):
    env = step_env(hub, tmp_path / "hf")
    hub.stop()
    proc = pin(env, f"--base-model={SDXL}", f"--output={tmp_path / 'out'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr  # the hub may come back: Airflow retries
    assert len(lines) == 1 and lines[0].startswith(f"error: pin-models: --base-model {SDXL}: not in the model cache")
    assert hub.endpoint in lines[0] and "could not be reached" in lines[0]
    assert not (tmp_path / "out").exists()
    offline = pin({**env, "HF_HUB_OFFLINE": "1"}, f"--base-model={SDXL}")
    assert offline.returncode == 65 and "HF_HUB_OFFLINE=1 forbids fetching it" in offline.stderr  # final
    assert len(offline.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("ref, says", [
    ("./models/sdxl", "no such folder"), ("models/evaluators/clip", "no such folder"), ("~/sdxl", "no such folder"),
    ("org/name@", "neither a Hugging Face id"), ("org/na me", "neither a Hugging Face id"),
    ("nobody/no-such-model", "no such model on"), (f"{SDXL}@no-such-branch", "no revision 'no-such-branch'"),
    ("/no/such/folder", "no such folder"),
])
def test_a_model_that_cannot_be_used_is_refused_in_one_line_naming_the_setting(hub, tmp_path, ref, says):
    proc = pin(step_env(hub, tmp_path / "hf"), f"--clip-model={ref}")
    assert proc.returncode == 65, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: pin-models: --clip-model {ref}") and says in line, line


def test_a_gated_model_asks_for_a_token(hub, models, tmp_path):
    hub.publish("gated/sdxl", folder_files(models["sdxl"]), gated=True)
    proc = pin(step_env(hub, tmp_path / "hf"), "--base-model=gated/sdxl")
    assert proc.returncode == 65 and "a gated model: accept its terms on the hub and set HF_TOKEN" in proc.stderr


def test_a_folder_named_like_the_hub_id_never_stands_in_for_the_model(hub, models, tmp_path):
    """diffusers prefers a local folder to a hub id: a folder `stabilityai/stable-diffusion-xl-base-1.0` where a
    step runs (a checkout where an old demo built a random-weight model there) must never be what loads for the id.
    Where it exists the id is refused, naming both readings; `./` means the folder; elsewhere the id is the hub's."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(models["sdxl"], checkout / SDXL)
    env = step_env(hub, tmp_path / "hf")
    refused = pin(env, f"--base-model={SDXL}", cwd=checkout)
    assert refused.returncode == 65 and "a folder of that name is in" in refused.stderr
    assert result(pin(env, f"--base-model=./{SDXL}", cwd=checkout))["base_model"] == str(checkout / SDXL)
    (tmp_path / "scratch").mkdir()
    pinned = result(pin(env, f"--base-model={SDXL}", cwd=tmp_path / "scratch"))["base_model"]
    where = subprocess.run([sys.executable, "-c", "import sys; from sd_tasks.models.model_refs import local_folder; "
                            "print(local_folder(sys.argv[1]))", pinned], env=env, capture_output=True, text=True,
                           cwd=tmp_path / "scratch", timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "hf"), where.stderr
