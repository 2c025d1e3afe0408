"""Hostile LoRA files: a checkpoint or champion whose weights file is not safetensors, has keys no LoRA has, or
shapes that do not fit the base model gets one line naming the file and the reason (exit 65), before anything is
loaded, registered or written."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, tree_snapshot
from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import MARKER
from sd_tasks.evaluation import evaluate
from sd_tasks.registry import register
from sd_tasks.training import train
from sd_tasks.training.checkpoint_files import LORA_WEIGHTS

from reliability.test_defects_train import Payload

pytestmark = pytest.mark.reliability



@pytest.fixture(scope="module")
def good(cache, models, tmp_path_factory) -> Path:
    result = train.run(train.TrainConfig(cache=cache, output=str(tmp_path_factory.mktemp("hostile") / "lora"),
                                         base_model=models["sdxl"], max_steps=1, checkpointing_steps=1,
                                         experiment="hostile"))
    return Path(result["checkpoints"][-1]["uri"])


@pytest.fixture(scope="module")
def good_te(cache, models, tmp_path_factory) -> Path:
    """A checkpoint whose LoRA is on both text encoders too (diffusers names their A and B `lora_linear_layer`)."""
    result = train.run(train.TrainConfig(cache=cache, output=str(tmp_path_factory.mktemp("hostile-te") / "lora"),
                                         base_model=models["sdxl"], max_steps=1, checkpointing_steps=1,
                                         train_text_encoder=True, experiment="hostile"))
    return Path(result["checkpoints"][-1]["uri"])


def lora(good: Path) -> tuple[dict, dict]:
    with safe_open(good / LORA_WEIGHTS, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def a_down_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.startswith("unet.") and k.endswith(".lora.down.weight"))


def hostile_files(good: Path, tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """{case: (file bytes, what the refusal must say)}."""
    tensors, metadata = lora(good)
    down = a_down_key(tensors)
    up = down.replace(".lora.down.", ".lora.up.")
    rank, fan_in = tensors[down].shape
    fan_out = tensors[up].shape[0]

    def safetensors(changed: dict, meta: dict | None = None) -> bytes:
        save_file({k: v.clone().contiguous() for k, v in changed.items()}, tmp_path / "f.safetensors", metadata=meta)
        return (tmp_path / "f.safetensors").read_bytes()

    torch.save({"unet": Payload(tmp_path / "code-ran")}, tmp_path / "evil.pt")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return {
        "a pickle named .safetensors": ((tmp_path / "evil.pt").read_bytes(), "not a safetensors file"),
        "a header length of 2**62 bytes": (struct.pack("<Q", 2 ** 62) + header, "not a safetensors file"),
        "an empty file": (b"", "not a safetensors file"),
        "a full weight of the base model": (safetensors({**tensors, "unet.conv_in.weight": torch.zeros(4, 4, 3, 3)},
                                                        metadata), "unexpected key 'unet.conv_in.weight'"),
        "a key that is no LoRA's": (safetensors({**tensors, "evil": torch.zeros(1)}, metadata), "unexpected key"),
        "a layer the base model lacks": (safetensors({**tensors, **{k.replace("down_blocks.1", "down_blocks.9"): v
                                                                     for k, v in tensors.items()}}, metadata),
                                         "not a Linear or Conv2d layer of the base model"),
        "an A for the wrong input size": (safetensors({**tensors, down: torch.zeros(rank, fan_in + 7)}, metadata),
                                          f"maps {fan_in + 7} inputs"),
        "a rank above the layer's size": (safetensors({**tensors, down: torch.zeros(fan_in + 1, fan_in),
                                                       up: torch.zeros(fan_out, fan_in + 1)}, metadata),
                                          "not one rank"),
        "an A without its B": (safetensors({k: v for k, v in tensors.items() if k != up}, metadata), "no B (up)"),
        "integer weights": (safetensors({**tensors, down: torch.zeros(rank, fan_in, dtype=torch.int32)}, metadata),
                            "not floating-point"),
        "metadata with another rank": (safetensors(tensors, {**metadata, "lora_adapter_metadata": json.dumps(
            {**json.loads(metadata["lora_adapter_metadata"]), "unet.r": 4096})}), "rank 4096"),
        "metadata that is not JSON": (safetensors(tensors, {**metadata, "lora_adapter_metadata": "{"}),
                                      "not a JSON object"),
    }


def hostile_text_encoder_files(good_te: Path, tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """{case: (file bytes, what the refusal must say)} for the text encoders' part of a LoRA file."""
    tensors, metadata = lora(good_te)
    down = next(k for k in sorted(tensors)
                if k.startswith("text_encoder.") and k.endswith(".lora_linear_layer.down.weight"))
    up = down.replace(".down.", ".up.")
    layer = down.removesuffix(".lora_linear_layer.down.weight")
    rank, fan_in = tensors[down].shape
    unet_down = a_down_key(tensors)
    other_rank = {**json.loads(metadata["lora_adapter_metadata"]), "text_encoder_2.r": 4096}

    def safetensors(changed: dict, meta: dict | None = None) -> bytes:
        save_file({k: v.clone().contiguous() for k, v in changed.items()}, tmp_path / "f.safetensors", metadata=meta)
        return (tmp_path / "f.safetensors").read_bytes()

    return {
        "a full weight of a text encoder": (safetensors({**tensors, f"{layer}.weight": torch.zeros(fan_in, fan_in)},
                                                        metadata), f"unexpected key '{layer}.weight'"),
        "a text-encoder layer the base model lacks": (
            safetensors({**tensors, **{k.replace("encoder.layers.0.", "encoder.layers.99."): v
                                       for k, v in tensors.items() if k.startswith("text_encoder.")}}, metadata),
            "text_encoder.encoder.layers.99.self_attn.k_proj is not a Linear or Conv2d layer of the base model"),
        "a text-encoder A for the wrong input size": (
            safetensors({**tensors, down: torch.zeros(rank, fan_in + 7)}, metadata), f"maps {fan_in + 7} inputs"),
        "a text-encoder A without its B": (safetensors({k: v for k, v in tensors.items() if k != up}, metadata),
                                           f"{layer} has no B (up)"),
        "a text-encoder A given twice, under two names": (
            safetensors({**tensors, f"{layer}.lora_A.weight": torch.zeros(rank, fan_in)}, metadata),
            f"{layer} has two A (down) matrices"),
        "the text encoders' names on a UNet layer": (
            safetensors({**tensors, unet_down.replace(".lora.down.", ".lora_linear_layer.down."):
                         tensors[unet_down]}, metadata), "unexpected key 'unet."),
        "text-encoder metadata with another rank": (
            safetensors(tensors, {**metadata, "lora_adapter_metadata": json.dumps(other_rank)}), "rank 4096"),
    }


def checkpoint_with(good: Path, folder: Path, weights: bytes) -> Path:
    """A whole checkpoint folder like `good` whose LoRA file is `weights`."""
    shutil.copytree(good, folder)
    (folder / LORA_WEIGHTS).write_bytes(weights)
    marker = json.loads((folder / MARKER).read_text())
    marker["files"][LORA_WEIGHTS] = len(weights)
    (folder / MARKER).write_text(json.dumps(marker))
    return folder


def evaluate_config(checkpoint: Path, output: Path, prepared, models) -> evaluate.EvaluateConfig:
    return evaluate.EvaluateConfig(checkpoint=str(checkpoint), output=str(output),
                                   instance_images=str(prepared / "resized"), prompts=["a sks dog"],
                                   clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=1,
                                   num_inference_steps=1, resolution=64)


def refused_by_evaluate(good: Path, cases: dict, tmp_path: Path, prepared, models) -> int:
    """How many of `cases` evaluate refused as it must: one line naming the file and the reason, nothing loaded or
    written (it asserts that every one was)."""
    refused = 0
    for i, (case, (weights, reason)) in enumerate(cases.items()):
        checkpoint = checkpoint_with(good, tmp_path / f"case-{i}" / "checkpoint-1", weights)
        before = tree_snapshot(checkpoint)
        output = tmp_path / f"case-{i}" / "eval"
        with pytest.raises(StepError) as error:
            evaluate.run(evaluate_config(checkpoint, output, prepared, models))
        message = str(error.value)
        assert message.startswith(f"{checkpoint}/{LORA_WEIGHTS}: ") and reason in message, (case, message)
        assert "\n" not in message, case
        assert not output.exists() and tree_snapshot(checkpoint) == before, case
        refused += 1
    return refused


def test_evaluate_refuses_each_hostile_lora_file_before_loading_anything(good, prepared, models, tmp_path, figures):
    cases = hostile_files(good, tmp_path)
    refused = refused_by_evaluate(good, cases, tmp_path, prepared, models)
    assert not (tmp_path / "code-ran").exists()
    figures.record("hostile", "LoRA files handed to evaluate --checkpoint",
                   f"{refused} of {len(cases)} hostile files refused in one line naming the file and the reason; "
                   f"nothing loaded or written", cases=len(cases), refused=refused, lost=0)


def test_evaluate_refuses_each_hostile_text_encoder_lora_file(good_te, prepared, models, tmp_path, figures):
    cases = hostile_text_encoder_files(good_te, tmp_path)
    refused = refused_by_evaluate(good_te, cases, tmp_path, prepared, models)
    figures.record("hostile", "LoRA files with text-encoder weights handed to evaluate --checkpoint",
                   f"{refused} of {len(cases)} hostile files refused in one line naming the file and the reason; "
                   f"nothing loaded or written", cases=len(cases), refused=refused, lost=0)


def test_a_hostile_file_through_the_evaluate_cli_exits_65_in_one_line(good, prepared, models, tmp_path, figures):
    weights, _ = hostile_files(good, tmp_path)["a layer the base model lacks"]
    checkpoint = checkpoint_with(good, tmp_path / "bad" / "checkpoint-1", weights)
    config = evaluate_config(checkpoint, tmp_path / "eval", prepared, models)
    argv = [sys.executable, "-m", "sd_tasks", "evaluate", "--checkpoint", config.checkpoint, "--output",
            config.output, "--instance-images", config.instance_images, "--prompts", *config.prompts,
            "--clip-model", config.clip_model, "--dino-model", config.dino_model, "--images-per-prompt", "1"]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 65, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"error: evaluate: {checkpoint}/{LORA_WEIGHTS}: unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1."
        f"to_k is not a Linear or Conv2d layer of the base model"], run.stderr[-2000:]
    figures.record("hostile", "a LoRA for layers the base model lacks, through the evaluate CLI",
                   "exit 65 with one line naming the file and the layer", lost=0)


def test_register_refuses_a_hostile_selected_checkpoint_and_registers_nothing(good, home, tmp_path, figures):
    weights, _ = hostile_files(good, tmp_path)["a full weight of the base model"]
    checkpoint = checkpoint_with(good, tmp_path / "sel" / "checkpoint-1", weights)
    (tmp_path / "selection").mkdir()
    (tmp_path / "selection" / "selection.json").write_text(json.dumps(
        {"selected": {"checkpoint": str(checkpoint), "learning_rate": 1e-4, "step": 1, "run_id": "r", "score": 0.0},
         "weights": {}}))
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "dataset.json").write_text(json.dumps(
        {"repo": "r", "path": "dog", "rev": "v1", "commit": "0" * 40, "hash": "h"}))
    config = register.RegisterConfig(selection=str(tmp_path / "selection"), dataset=str(tmp_path / "dataset"),
                                     output=str(tmp_path / "registration"), model_name="hostile-lora",
                                     experiment="hostile")
    with pytest.raises(StepError) as error:
        register.run(config)
    assert str(error.value).startswith(f"{checkpoint}/{LORA_WEIGHTS}: unexpected key 'unet.conv_in.weight'")
    assert not (tmp_path / "registration").exists()
    assert not tracking.client().search_registered_models("name = 'hostile-lora'")
    figures.record("hostile", "a selected checkpoint whose LoRA file overrides a base weight, to register",
                   "refused naming the file and key; no model version, nothing written", lost=0)


def test_a_hostile_champion_is_not_fetched(good, home, tmp_path, figures):
    import mlflow

    weights, _ = hostile_files(good, tmp_path)["a pickle named .safetensors"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / LORA_WEIGHTS).write_bytes(weights)
    client = tracking.client()
    with mlflow.start_run(experiment_id=tracking.experiment_id("hostile-champion")) as run:
        mlflow.log_artifacts(str(tmp_path / "model"), "lora")
    client.create_registered_model("hostile-champion")
    version = client.create_model_version("hostile-champion", f"runs:/{run.info.run_id}/lora", run.info.run_id,
                                          tags={"base_model": "x"})
    client.set_registered_model_alias("hostile-champion", register.CHAMPION, version.version)

    output = tmp_path / "champion"
    with pytest.raises(StepError) as error:
        register.champion(register.ChampionConfig(model_name="hostile-champion", output=str(output)))
    assert str(error.value).startswith(f"models:/hostile-champion/{version.version} ({LORA_WEIGHTS}): not a "
                                       f"safetensors file")
    assert not output.exists() and not (tmp_path / "code-ran").exists()
    figures.record("hostile", "a champion whose registered LoRA file is a pickle",
                   "refused naming the model version; no checkpoint folder written, nothing unpickled", lost=0)


def test_a_checkpoint_train_writes_passes_the_checks(good, good_te, models):
    # The checks refuse nothing train writes (a plain LoRA, one on the text encoders too; DoRA's magnitudes in
    # test_defects_train).
    tensors, _ = lora(good)
    assert load_file(good / LORA_WEIGHTS).keys() == tensors.keys()
    evaluate.lora_files.check_checkpoints([str(good), str(good_te)], models["sdxl"])
