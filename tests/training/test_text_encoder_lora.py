"""A LoRA trained on both text encoders (`train --train-text-encoder`) end to end: its files pass the checks, every
checkpoint is evaluated in one process with its own text-encoder LoRA (loaded, not hot-swapped: diffusers cannot
hot-swap text encoders), the best is registered, fetched as champion and loads back from the registry with its
text-encoder adapters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_tasks.core import tracking
from sd_tasks.evaluation import evaluate, select
from sd_tasks.registry import register
from sd_tasks.training import lora_files, train
from sd_tasks.training.checkpoint_files import KOHYA_WEIGHTS, LORA_WEIGHTS

from test_evaluate_per_run import hotswaps, per_image, suite

MODEL = "dog-te-lora"


@pytest.fixture(scope="module")
def te_run(prepared, cache, models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text-encoder")
    parent = tracking.run(tracking.StartRunConfig(experiment="dog-te", run_key="test/te-1"))["run_id"]
    result = train.run(train.TrainConfig(
        cache=cache, output=str(root / "train" / "lr-1e-3"), base_model=models["sdxl"], learning_rate=1e-3,
        text_encoder_lr=1e-2, train_text_encoder=True, max_steps=4, checkpointing_steps=2, experiment="dog-te",
        parent_run_id=parent))
    return {"root": root, "parent": parent, "result": result, "uris": [c["uri"] for c in result["checkpoints"]]}


@pytest.fixture(scope="module")
def evaluated(te_run, prepared, models) -> dict:
    """Every checkpoint in one `evaluate --training-run` process (its LoRA loads recorded), the base model, and each
    checkpoint again in a process of its own."""
    root = te_run["root"]
    with pytest.MonkeyPatch.context() as patch:
        swaps = hotswaps(patch)
        evaluate.run(evaluate.EvaluateConfig(training_run=str(root / "train" / "lr-1e-3"),
                                             output=str(root / "eval" / "lr-1e-3"), **suite(prepared, models)))
    evaluate.run(evaluate.EvaluateConfig(base_model=models["sdxl"], output=str(root / "eval" / "base"),
                                         **suite(prepared, models)))
    for uri in te_run["uris"]:
        evaluate.run(evaluate.EvaluateConfig(checkpoint=uri, output=str(root / "single" / Path(uri).name),
                                             **suite(prepared, models)))
    return {"swaps": swaps}


def test_its_files_pass_the_checks_and_its_kohya_file_names_the_text_encoders_as_comfyui_does(te_run, models,
                                                                                             tmp_path):
    lora_files.check_checkpoints(te_run["uris"], models["sdxl"])  # against the base model's layers too
    last = Path(te_run["uris"][-1])
    assert lora_files.components(last / LORA_WEIGHTS) == {"unet", "text_encoder", "text_encoder_2"}
    layers = lora_files.base_layers(models["sdxl"])
    tensors = load_file(last / LORA_WEIGHTS)
    renamings = {  # what diffusers loads as well: peft's names, and text encoder 1 as transformers 4 named it
        "peft": lambda k: k.replace("lora_linear_layer.down", "lora_A").replace("lora_linear_layer.up", "lora_B"),
        "text_model": lambda k: k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")}
    for name, rename in renamings.items():
        save_file({rename(k): v for k, v in tensors.items()}, tmp_path / f"{name}.safetensors")
        lora_files.check(tmp_path / f"{name}.safetensors", name, layers)
    kohya = load_file(last / KOHYA_WEIGHTS)
    for prefix in ("lora_te1_", "lora_te2_"):  # A1111 and ComfyUI map CLIP's layers by these names alone
        keys = [k for k in kohya if k.startswith(prefix)]
        assert keys and all(k.startswith(f"{prefix}text_model_encoder_layers_") for k in keys), keys[:2]


def test_one_process_evaluates_each_checkpoint_with_its_own_text_encoder_lora(te_run, evaluated):
    root = te_run["root"]
    assert evaluated["swaps"] == [False, False]  # loaded each time: diffusers refuses to hot-swap text encoders
    steps = [Path(uri).name.removeprefix("checkpoint-") for uri in te_run["uris"]]
    per_run = [json.loads((root / "eval" / "lr-1e-3" / f"step-{s}" / "metrics.json").read_text()) for s in steps]
    single = [json.loads((root / "single" / f"checkpoint-{s}" / "metrics.json").read_text()) for s in steps]
    images = [(root / "eval" / "lr-1e-3" / f"step-{s}" / "images" / "p00-0.png").read_bytes() for s in steps]
    assert len(steps) == 2 and images[0] != images[1]  # the checkpoints draw different images
    for one, other in zip(single, per_run):  # a stale text-encoder LoRA would move them
        assert one["suite"] == other["suite"] and not other["broken"]
        assert per_image(other) == pytest.approx(per_image(one), abs=1e-5)


def test_the_best_is_registered_fetched_as_champion_and_loads_with_its_text_encoder_lora(te_run, evaluated,
                                                                                           prepared, models):
    import mlflow
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder
    from peft.utils import get_peft_model_state_dict

    root = te_run["root"]
    chosen = select.run(select.SelectConfig(evaluations=str(root / "eval"), output=str(root / "select"),
                                            parent_run_id=te_run["parent"]))["selected"]
    for checkpoint, name in ((chosen["checkpoint"], "challenger"), (None, "base")):  # the confirmation suite
        evaluate.run(evaluate.EvaluateConfig(checkpoint=checkpoint, base_model=models["sdxl"], seed=1_000_000,
                                             output=str(root / "confirm" / name), **suite(prepared, models)))
    registered = register.run(register.RegisterConfig(
        selection=str(root / "select"), dataset=str(prepared / "dataset"), model_name=MODEL,
        output=str(root / "register"), parent_run_id=te_run["parent"], confirmation=str(root / "confirm"),
        margin=-10))  # tiny random evaluators cannot see a subject: no floor here
    assert registered["version"] == 1 and registered["promoted"]

    champion = register.champion(register.ChampionConfig(model_name=MODEL, output=str(root / "champion")))
    assert champion["version"] == 1
    lora_files.check_checkpoints([champion["checkpoint"]], models["sdxl"])
    weights = load_file(Path(chosen["checkpoint"]) / LORA_WEIGHTS)
    assert load_file(Path(champion["checkpoint"]) / LORA_WEIGHTS).keys() == weights.keys()

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    settings = {"num_inference_steps": 2, "height": 64, "width": 64}
    assert model.predict({"prompt": ["a photo of sks dog"]}, params=settings)[0][:8] == b"\x89PNG\r\n\x1a\n"
    pipe = model.get_raw_model()
    adapters = pipe.get_list_adapters()
    assert set(adapters) == {"unet", "text_encoder", "text_encoder_2"}, adapters
    for name in ("text_encoder", "text_encoder_2"):  # the registered file's text-encoder weights, all of them
        loaded = get_peft_model_state_dict(getattr(pipe, name), adapter_name=adapters[name][0])
        saved = {k.removeprefix(f"{name}.").replace("lora_linear_layer.down", "lora_A")
                 .replace("lora_linear_layer.up", "lora_B"): v for k, v in weights.items() if k.startswith(f"{name}.")}
        assert loaded.keys() == saved.keys() and all(torch.allclose(loaded[k].float(), saved[k]) for k in saved)

    def image():
        return pipe("a photo of sks dog", generator=torch.Generator().manual_seed(0), output_type="np",
                    **settings).images[0]

    with_lora = image()
    for name in ("text_encoder", "text_encoder_2"):
        disable_lora_for_text_encoder(getattr(pipe, name))
    assert abs(image() - with_lora).max() > 1e-4  # the text encoders' LoRA draws its part of every image
