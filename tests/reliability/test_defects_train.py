"""Defects of the train step found by reading it, each proved here with the real components: resuming never
unpickles what is in the bucket, the fp16 loss scaler survives a resume, a DoRA checkpoint carries no kohya file
ComfyUI would misread, and the text encoders train under data parallelism."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO
from dreamline.operators import step_argv
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import MARKER
from sd_tasks.models import loading as sd_models
from sd_tasks.training import lora_files, train

pytestmark = pytest.mark.reliability


class Payload:
    """What an attacker puts in a pickle: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def put_file(folder: Path, name: str, data: bytes) -> None:
    """Write a file into a checkpoint and list it in the completion marker, as anyone who can write to the bucket
    can: the folder stays whole."""
    (folder / name).write_bytes(data)
    marker = json.loads((folder / MARKER).read_text())
    marker["files"][name] = len(data)
    (folder / MARKER).write_text(json.dumps(marker))


def pickle_bytes(marker: Path, tmp_path: Path) -> bytes:
    torch.save({"step": 2, "lora": Payload(marker)}, tmp_path / "evil.pt")
    return (tmp_path / "evil.pt").read_bytes()


@pytest.fixture(scope="module")
def config(cache, models, tmp_path_factory):
    return train.TrainConfig(cache=cache, output=str(tmp_path_factory.mktemp("defects") / "lora"),
                             base_model=models["sdxl"], learning_rate=1e-3, max_steps=2, checkpointing_steps=2,
                             lora_alpha=8.0, experiment="defects")


@pytest.fixture(scope="module")
def two_steps(config) -> Path:
    """A run stopped at step 2 (of 4), to be resumed."""
    train.run(replace(config, max_steps=4, stop_at_step=2))
    return Path(config.output) / "checkpoint-2"


def test_a_pickle_beside_the_state_is_never_unpickled_and_resume_gives_the_uninterrupted_weights(
        config, two_steps, tmp_path, figures):
    marker = tmp_path / "code-ran"
    put_file(two_steps, "training_state.pt", pickle_bytes(marker, tmp_path))  # the old name, beside the new state

    try:
        resumed = train.run(replace(config, max_steps=4))
    finally:
        assert not marker.exists(), "the pickle was unpickled: its code ran"
    assert resumed["resumed_from"] == 2
    straight = train.run(replace(config, max_steps=4, output=str(tmp_path / "straight"), experiment="defects-2"))
    a = load_file(f"{config.output}/checkpoint-4/{train.LORA_WEIGHTS}")
    b = load_file(f"{straight['output']}/checkpoint-4/{train.LORA_WEIGHTS}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    figures.record("defect", "train resume loads no pickle (beside the state)",
                   "a pickle beside the safetensors state is ignored; resume gives the uninterrupted weights", lost=0)


def forge_checkpoint(two_steps: Path, step: int, state_files: dict[str, bytes]) -> Path:
    """A whole checkpoint-<step> beside `two_steps`, with its LoRA and info but these state files: an old-style
    checkpoint, or one an attacker wrote."""
    forged = two_steps.parent / f"checkpoint-{step}"
    forged.mkdir()
    (forged / MARKER).write_text(json.dumps({"format": 1, "files": {}}))
    for name in (train.LORA_WEIGHTS, train.CHECKPOINT_INFO):
        put_file(forged, name, (two_steps / name).read_bytes())
    for name, data in state_files.items():
        put_file(forged, name, data)
    return forged


def test_a_checkpoint_holding_only_a_pickle_is_refused_with_one_line(config, two_steps, tmp_path, figures):
    marker = tmp_path / "code-ran"
    forged = forge_checkpoint(two_steps, 6, {"training_state.pt": pickle_bytes(marker, tmp_path)})

    try:
        with pytest.raises(StepError) as refused:
            train.run(replace(config, max_steps=8))
    finally:
        assert not marker.exists(), "the pickle was unpickled: its code ran"
    message = str(refused.value)
    assert f"{forged}/training_state.pt" in message and "pickle" in message and "\n" not in message
    figures.record("defect", "train resume loads no pickle (old-style checkpoint)",
                   "a checkpoint whose state is a pickle is refused, naming the file; never unpickled", lost=0)


def test_a_pickle_in_place_of_the_safetensors_state_is_refused(config, two_steps, tmp_path, figures):
    marker = tmp_path / "code-ran"
    real_json = two_steps / "training_state.json"
    forged = forge_checkpoint(two_steps, 8, {
        "training_state.safetensors": pickle_bytes(marker, tmp_path),
        "training_state.json": real_json.read_bytes() if real_json.exists() else b"{}"})

    with pytest.raises(StepError) as refused:
        train.run(replace(config, max_steps=10))
    assert not marker.exists()
    message = str(refused.value)
    assert f"{forged}/training_state.safetensors" in message and "\n" not in message
    figures.record("hostile", "a pickle named training_state.safetensors",
                   "refused as not a safetensors file, naming it; never unpickled", lost=0)


def test_a_state_of_another_rank_is_refused_not_half_loaded(config, two_steps, tmp_path, figures):
    # peft loads the layers whose shapes match and leaves the others as initialised; a run started again with
    # another rank must say so instead.
    output = tmp_path / "other-rank"
    shutil.copytree(two_steps, output / "checkpoint-2")
    with pytest.raises(StepError) as refused:
        train.run(replace(config, output=str(output), rank=8, max_steps=4))
    message = str(refused.value)
    assert message.startswith(f"{output}/checkpoint-2/{train.TRAINING_STATE}: does not fit this run")
    assert "\n" not in message and not (output / "checkpoint-4").exists()
    figures.record("fault", "resume with another LoRA rank",
                   "refused in one line naming the state file; nothing half-loaded, nothing written", lost=0)


def test_the_fp16_loss_scaler_is_saved_and_restored(config, two_steps, tmp_path, figures):
    # accelerate runs no loss scaler on the CPU (fp16 there is plain fp32 compute), so the state functions get a
    # real torch GradScaler whose scale and growth tracker moved away from their defaults.
    from diffusers.optimization import get_scheduler

    def trainable():
        unet = sd_models.load_unet(config.base_model)
        train.add_lora(unet, config)
        optimizer = train.make_optimizer(train.param_groups(unet, None, config), config)
        return unet, optimizer, get_scheduler("constant", optimizer)

    unet, optimizer, schedule = trainable()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    params = [p for p in unet.parameters() if p.requires_grad]
    for overflow in (True, False, False):  # one overflow halves the scale; two good steps move the tracker
        loss = sum((p.float() ** 2).sum() for p in params) * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0 ** 9 and saved["_growth_tracker"] == 2
    output = str(tmp_path / "fp16")
    train.save_checkpoint({"unet": unet}, optimizer, schedule, replace(config, output=output), 3, "run",
                          scaler=scaler)

    unet, optimizer, schedule = trainable()
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    step, _ = train.resume(output, {"unet": unet}, optimizer, schedule, scaler=fresh)
    assert step == 3 and fresh.state_dict() == saved
    figures.record("defect", "fp16 resume keeps the loss scaler",
                   "the scaler's scale and growth tracker come back exactly from the checkpoint", lost=0)


COMFY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


def comfy_key_problems(path: Path, base_model: str) -> list[str]:
    """What ComfyUI's kohya key mapping (comfy/lora.py model_lora_keys_unet + load_lora) would not read: keys that
    are not `lora_unet_<module>.<lora_down.weight|lora_up.weight|alpha|dora_scale>` of a UNet Linear or Conv2d, or
    shapes other than down (rank, in), up (out, rank), alpha a scalar, dora_scale (1, in) (weight_decompose)."""
    unet = sd_models.load_unet(base_model)
    layers = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    problems = []
    with safe_open(path, "pt") as f:
        for key in f.keys():
            module, _, suffix = key.partition(".")
            shape = tuple(f.get_slice(key).get_shape())
            layer = layers.get(module)
            if layer is None or suffix not in COMFY_SUFFIXES:
                problems.append(f"{key}: not a key ComfyUI reads")
                continue
            fan_in = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
            fan_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
            ok = {"lora_down.weight": len(shape) >= 2 and shape[1] == fan_in,
                  "lora_up.weight": len(shape) >= 2 and shape[0] == fan_out,
                  "alpha": shape == (), "dora_scale": shape[:2] == (1, fan_in)}[suffix]
            if not ok:
                problems.append(f"{key}: shape {shape}")
    return problems


def test_a_dora_checkpoint_writes_no_kohya_file_comfyui_would_misread(config, tmp_path, figures):
    result = train.run(replace(config, dora=True, max_steps=1, checkpointing_steps=1,
                               output=str(tmp_path / "dora"), experiment="defects-dora"))
    checkpoint = Path(result["checkpoints"][-1]["uri"])
    kohya = checkpoint / train.KOHYA_WEIGHTS
    problems = comfy_key_problems(kohya, config.base_model) if kohya.exists() else []
    assert problems == []
    # peft's DoRA magnitude is one number per output row; kohya's and ComfyUI's dora_scale is one per input column
    # (weight_decompose): no exact conversion exists, so the checkpoint says why it has no kohya file.
    assert not kohya.exists()
    assert "DoRA" in json.loads((checkpoint / train.CHECKPOINT_INFO).read_text())["kohya"]
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(checkpoint / train.LORA_WEIGHTS))
    lora_files.check_checkpoints([str(checkpoint)], config.base_model)  # evaluate takes it
    figures.record("defect", "kohya export with DoRA",
                   "no kohya file with keys ComfyUI cannot read; the diffusers file keeps the magnitudes", lost=0)


def test_a_plain_checkpoint_kohya_file_maps_to_comfyui_keys(config, two_steps):
    assert comfy_key_problems(two_steps / train.KOHYA_WEIGHTS, config.base_model) == []


def test_text_encoders_train_under_data_parallelism(config, tmp_path, figures):
    # Text encoder 1's last layer gets no gradient (SDXL reads its penultimate hidden state): DDP must be told.
    options = {"cache": config.cache, "output": str(tmp_path / "ddp-te"), "base_model": config.base_model,
               "learning_rate": 1e-3, "max_steps": 2, "checkpointing_steps": 2, "train_text_encoder": True,
               "experiment": "defects-ddp-te"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, "-m", "sd_tasks", *step_argv("train", options)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert [c["step"] for c in result["checkpoints"]] == [2]
    prefixes = {k.split(".")[0] for k in load_file(f"{result['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}")}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    figures.record("defect", "text-encoder LoRA under data parallelism",
                   "two processes train both text encoders past step 1", lost=0)
