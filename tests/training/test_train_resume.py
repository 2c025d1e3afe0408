"""Preemption: a training process killed with SIGKILL after a checkpoint resumes from it and ends with the same
weights as an uninterrupted run; both output formats load in stock diffusers and give the same images."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from dreamline.operators import step_argv
from sd_tasks.training import train


@pytest.fixture(scope="module")
def config(cache, models, tmp_path_factory):
    return train.TrainConfig(cache=cache, output=str(tmp_path_factory.mktemp("resume") / "killed"),
                             base_model=models["sdxl"], learning_rate=1e-3, max_steps=12, checkpointing_steps=2,
                             checkpoints_total_limit=3, gradient_accumulation_steps=2, snr_gamma=5.0,
                             noise_offset=0.05, lora_alpha=8.0, experiment="resume")


def test_sigkill_after_a_checkpoint_then_restart_gives_the_uninterrupted_weights(config, tmp_path):
    argv = [sys.executable, "-m", "sd_tasks", *step_argv("train", {k: getattr(config, k) for k in (
        "cache", "output", "base_model", "learning_rate", "max_steps", "checkpointing_steps",
        "checkpoints_total_limit", "gradient_accumulation_steps", "snr_gamma", "noise_offset", "lora_alpha",
        "experiment")})]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = lambda: [c["step"] for c in train.list_checkpoints(config.output)]  # noqa: E731
    deadline = time.monotonic() + 300
    while not checkpoints() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    at_kill = checkpoints()
    assert at_kill and at_kill[-1] < config.max_steps, "the run must be killed part-way"

    second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming from {config.output}/checkpoint-{at_kill[-1]}" in second.stderr
    assert checkpoints() == [8, 10, 12]  # checkpoints_total_limit=3

    straight = train.run(replace(config, output=str(tmp_path / "straight"), experiment="resume-straight"))
    assert straight["resumed_from"] is None
    resumed = load_file(f"{config.output}/checkpoint-12/{train.LORA_WEIGHTS}")
    uninterrupted = load_file(f"{tmp_path}/straight/checkpoint-12/{train.LORA_WEIGHTS}")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_finished_run_started_again_does_no_more_work(config):
    again = train.run(config)
    assert again["resumed_from"] == config.max_steps and [c["step"] for c in again["checkpoints"]] == [8, 10, 12]


def test_a_checkpoint_that_lost_a_file_is_skipped_and_training_resumes_from_the_newest_whole_one(config, capfd):
    from pathlib import Path

    newest = Path(config.output) / "checkpoint-12"
    weights = load_file(newest / train.LORA_WEIGHTS)
    (newest / train.TRAINING_STATE).unlink()  # say a sync or a clean-up lost it
    assert [c["step"] for c in train.list_checkpoints(config.output)] == [8, 10]

    again = train.run(config)
    assert again["resumed_from"] == 10 and [c["step"] for c in again["checkpoints"]] == [8, 10, 12]
    err = capfd.readouterr().err
    assert f"{newest} is incomplete ({train.TRAINING_STATE} is missing)" in err
    assert f"resuming from {config.output}/checkpoint-10" in err
    rewritten = load_file(newest / train.LORA_WEIGHTS)
    assert all(torch.equal(rewritten[k], weights[k]) for k in weights)  # the same two steps, the same weights


def test_diffusers_and_kohya_files_load_in_stock_diffusers_and_give_the_same_images(config, models):
    from diffusers import StableDiffusionXLPipeline

    checkpoint = f"{config.output}/checkpoint-12"
    kohya = load_file(f"{checkpoint}/{train.KOHYA_WEIGHTS}")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])

    def image():
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    pipe.load_lora_weights(checkpoint, weight_name=train.LORA_WEIGHTS, adapter_name="diffusers")
    from_diffusers = image()
    pipe.delete_adapters("diffusers")
    pipe.load_lora_weights(checkpoint, weight_name=train.KOHYA_WEIGHTS, adapter_name="kohya")
    from_kohya = image()
    assert abs(from_diffusers - base).max() > 1e-4
    assert abs(from_kohya - from_diffusers).max() < 1e-5


def test_text_encoder_lora_is_saved_in_both_formats_and_loads_the_same(cache, models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = train.run(train.TrainConfig(cache=cache, output=str(tmp_path / "te"), base_model=models["sdxl"],
                                         learning_rate=1e-2, text_encoder_lr=5e-3, train_text_encoder=True,
                                         max_steps=2, checkpointing_steps=2, experiment="te"))
    checkpoint = result["checkpoints"][-1]["uri"]
    prefixes = {k.split(".")[0] for k in load_file(f"{checkpoint}/{train.LORA_WEIGHTS}")}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    kohya_prefixes = {k.split("_")[1] for k in load_file(f"{checkpoint}/{train.KOHYA_WEIGHTS}")}
    assert kohya_prefixes == {"unet", "te1", "te2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])

    def image():
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    pipe.load_lora_weights(checkpoint, weight_name=train.LORA_WEIGHTS, adapter_name="diffusers")
    from_diffusers = image()
    pipe.delete_adapters("diffusers")
    pipe.load_lora_weights(checkpoint, weight_name=train.KOHYA_WEIGHTS, adapter_name="kohya")
    assert abs(image() - from_diffusers).max() < 1e-5
