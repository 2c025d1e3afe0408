"""The models of a local deployment (deploy/local/models.py): the tiny ones built only where their defaults point,
the real ids fetched and pinned, never a folder of the checkout, and one line for what cannot run here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from deploy.local import models
from deploy.local.settings import Stack

HUB = models.hub_models()


@pytest.fixture
def models_built(models):  # conftest's tiny models (this module's `models` is deploy.local.models)
    return models


def test_the_model_set_and_each_setting(tmp_path):
    folder = tmp_path / "models"
    assert models.chosen({}, folder, tmp_path) == models.tiny_models(folder)
    assert models.chosen({"DREAMLINE_MODELS": "hub"}, folder, tmp_path) == HUB
    mixed = models.chosen({"DREAMLINE_BASE_MODEL": HUB["DREAMLINE_BASE_MODEL"]}, folder, tmp_path)
    assert mixed["DREAMLINE_BASE_MODEL"] == HUB["DREAMLINE_BASE_MODEL"] and models.from_hub(mixed) == [
        "DREAMLINE_BASE_MODEL"]
    assert models.environment(models.tiny_models(folder))["HF_HUB_OFFLINE"] == "1"  # no hub id: never the hub
    assert "HF_HUB_OFFLINE" not in models.environment(HUB)


@pytest.mark.parametrize("environ, says", [
    ({"DREAMLINE_MODELS": "real"}, "DREAMLINE_MODELS='real': choose tiny"),
    ({"DREAMLINE_CLIP_MODEL": "./clip"}, "DREAMLINE_CLIP_MODEL=./clip: neither a Hugging Face id"),
    ({"DREAMLINE_DINO_MODEL": "models/evaluators/dino"}, "neither a Hugging Face id"),
    # the folder an old `make demo` built in the checkout under the hub id's name: the user must say which they mean
    ({"DREAMLINE_BASE_MODEL": HUB["DREAMLINE_BASE_MODEL"]}, "a folder of that name is in"),
])
def test_a_model_setting_that_means_two_things_or_nothing_is_refused_in_one_line(tmp_path, environ, says):
    (tmp_path / HUB["DREAMLINE_BASE_MODEL"]).mkdir(parents=True)
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(".", r"\.")) as refused:
        models.chosen(environ, tmp_path / "models", cwd=tmp_path)
    assert "\n" not in str(refused.value)


def test_sdxl_at_its_real_size_needs_a_gpu_unless_the_cpu_is_asked_for(tmp_path, models_built):
    folder = tmp_path / "models"
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    with pytest.raises(ValueError, match="SDXL needs a CUDA GPU and this machine has none"):
        models.gpu_environment(HUB, no_gpu)
    assert models.gpu_environment(HUB, {**no_gpu, "DREAMLINE_DEVICE": "cpu"}) == {}
    assert models.gpu_environment(models.tiny_models(folder), no_gpu) == {}  # not built yet: built tiny
    # a tiny pipeline anywhere on this machine runs on the CPU; a folder holding SDXL's real UNet needs the GPU
    local = {**HUB, "DREAMLINE_BASE_MODEL": models_built["sdxl"]}
    assert models.gpu_environment(local, no_gpu) == {}
    full = tmp_path / "sdxl-base" / "unet"
    full.mkdir(parents=True)
    (full / "config.json").write_text('{"block_out_channels": [320, 640, 1280]}')
    with pytest.raises(ValueError, match="SDXL needs a CUDA GPU"):
        models.gpu_environment({**HUB, "DREAMLINE_BASE_MODEL": str(full.parent)}, no_gpu)
    # one pool slot per GPU and the GPUs to share out, unless the slots are set
    assert models.gpu_environment(HUB, {"CUDA_VISIBLE_DEVICES": "0,1,3"}) == {
        "DREAMLINE_GPU_DEVICES": "0,1,3", "DREAMLINE_GPU_SLOTS": "3"}
    assert models.gpu_environment(HUB, {"CUDA_VISIBLE_DEVICES": "2", "DREAMLINE_GPU_SLOTS": "1"}) == {
        "DREAMLINE_GPU_DEVICES": "2", "DREAMLINE_GPU_SLOTS": "1"}
    assert models.gpu_devices({}) == []  # this machine: torch sees no CUDA device


def test_the_stack_runs_the_models_it_is_given(tmp_path):
    stack = Stack.create(tmp_path, {}, schedules=False)
    assert stack.deployment_env()["DREAMLINE_BASE_MODEL"] == str(tmp_path / "models" / "tiny-sdxl")
    assert stack.deployment_env()["HF_HUB_OFFLINE"] == "1"
    stack.models, stack.gpu_devices = HUB, "0,1"
    env = stack.deployment_env()
    assert {k: env[k] for k in HUB} == HUB and "HF_HUB_OFFLINE" not in env
    assert env["DREAMLINE_GPU_DEVICES"] == "0,1"
    stack.save()
    assert Stack.load(tmp_path).models == HUB  # kept for the stack's later `up` and its stack.env


def demo(tmp_path, **env) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DREAMLINE_", "MLFLOW_"))}
    environ |= {"DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"), "HF_HOME": str(tmp_path / "hf"),
                "HF_ENDPOINT": "http://127.0.0.1:9", "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], env=environ, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("env, says", [
    ({"DREAMLINE_BASE_MODEL": HUB["DREAMLINE_BASE_MODEL"]}, "SDXL needs a CUDA GPU"),  # the first try
    ({"DREAMLINE_MODELS": "hub"}, "SDXL needs a CUDA GPU"),
    ({"DREAMLINE_MODELS": "hub", "DREAMLINE_DEVICE": "cpu"},
     f"--base-model {HUB['DREAMLINE_BASE_MODEL']}: not in the model cache"),
])
def test_the_demo_with_the_real_ids_and_no_hub_says_what_is_missing_and_trains_nothing(tmp_path, env, says):
    before = set(os.listdir(REPO))
    proc = demo(tmp_path, **env)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: make demo: ") and says in line, line
    assert set(os.listdir(REPO)) == before  # no folder of the checkout written
    assert not (tmp_path / "home" / "models").exists() and not (tmp_path / "home" / "airflow").exists()
    assert not (Path(REPO) / HUB["DREAMLINE_BASE_MODEL"]).exists()
