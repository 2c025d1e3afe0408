"""The serving tests' registry: LoRAs trained on the tiny SDXL and registered in this session's MLflow, as `register`
logs them, one subject per case a server must handle."""
from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def register(name: str, checkpoint: Path, base_model: str, alias: str | None, **tags) -> int:
    """A version of `name` holding the checkpoint's LoRA, as `register` logs it, with these tags."""
    import mlflow

    from sd_tasks.core import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(experiment_id=tracking.experiment_id("serving-test")):
        model = mlflow.diffusers.log_model(str(checkpoint / "pytorch_lora_weights.safetensors"),
                                           base_model=base_model, adapter_type="lora", name="lora",
                                           pip_requirements=["diffusers"])
    version = int(mlflow.register_model(model.model_uri, name, tags={"base_model": base_model, **tags}).version)
    if alias:
        tracking.client().set_registered_model_alias(name, alias, str(version))
    return version


@pytest.fixture(scope="session")
def versions(cache, models, tmp_path_factory):
    """rex: v1 (step 2, champion) and v2 (step 4); fox: v1 (step 4, champion); cat: a broken champion; owl:
    registered, no champion; junk: a champion whose file is no LoRA; kim, liv and max: champions whose consent does not
    cover serving today (expired, never for serving, an expiry that is no date)."""
    from sd_tasks.training import train

    out = tmp_path_factory.mktemp("serving-train")
    train.run(train.TrainConfig(cache=cache, output=str(out), base_model=models["sdxl"], learning_rate=1e-2,
                                max_steps=4, checkpointing_steps=2, experiment="serving-test"))
    sdxl = models["sdxl"]
    rex = [register("rex-sdxl-lora", out / "checkpoint-2", sdxl, "champion", instance="sks dog", **{
        "score.broken": "false"}), register("rex-sdxl-lora", out / "checkpoint-4", sdxl, None, instance="sks dog")]
    fox = register("fox-sdxl-lora", out / "checkpoint-4", sdxl, "champion", instance="sks fox")
    register("cat-sdxl-lora", out / "checkpoint-2", sdxl, "champion", **{"score.broken": "true"})
    register("owl-sdxl-lora", out / "checkpoint-2", sdxl, None)
    # trained under consent records: kim's expired yesterday, liv's never covered serving
    register("kim-sdxl-lora", out / "checkpoint-2", sdxl, "champion", instance="sks person", **{
        "consent.id": "c-kim", "consent.expires": (date.today() - timedelta(days=1)).isoformat(),
        "consent.scope": "training,serving"})
    register("liv-sdxl-lora", out / "checkpoint-2", sdxl, "champion", instance="sks person", **{
        "consent.id": "c-liv", "consent.expires": (date.today() + timedelta(days=99)).isoformat(),
        "consent.scope": "training"})
    register("max-sdxl-lora", out / "checkpoint-2", sdxl, "champion", instance="sks person", **{
        "consent.id": "c-max", "consent.expires": "soon", "consent.scope": "training,serving"})
    junk = out / "junk"
    junk.mkdir()
    save_file({"not.a.lora.weight": torch.zeros(2)}, junk / "pytorch_lora_weights.safetensors")
    register("junk-sdxl-lora", junk, sdxl, "champion", instance="sks dog")
    return {"rex": rex, "fox": fox, "checkpoints": out}
