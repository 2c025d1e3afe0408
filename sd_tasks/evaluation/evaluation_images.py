"""Fixed-seed images for an evaluation: the base pipeline with a checkpoint's LoRA switched on or off.

Every image is marked (sd_tasks.safety.marking) as it is made: what a reviewer downloads from MLflow is marked too.
The seeds depend only on the base seed, the prompt's place and the image's, so every checkpoint of every learning
rate, the champion and the base model are drawn from the same starting noise. One `Generator` serves every
evaluation of a process: LoRA weights are swapped in place where the layout allows (sd_tasks.evaluation.evaluate).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_tasks.core.cost import count_images
from sd_tasks.core.errors import StepError
from sd_tasks.models.loading import load_pipeline, load_refiner
from sd_tasks.safety.marking import mark
from sd_tasks.training import lora_files
from sd_tasks.training.checkpoint_files import LORA_WEIGHTS


def prompt_seeds(config, prompt_index: int) -> list[int]:
    """The seeds of one prompt's images: they depend only on the base seed, the prompt's place and the image's."""
    return [config.seed + 1000 * prompt_index + k for k in range(config.images_per_prompt)]


class Generator:
    """The base pipeline, with the checkpoint's LoRA switched on or off, and the optional refiner."""

    def __init__(self, base_model: str, config):
        self.config = config
        self.pipe = load_pipeline(base_model, config.dtype, config.vae)
        if config.scheduler:
            self.pipe.scheduler = scheduler_class(config.scheduler).from_config(self.pipe.scheduler.config)
        self.refiner = None
        if config.refiner_model:
            self.refiner = load_refiner(config.refiner_model, self.pipe)
        self.size = config.resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.loaded, self.layout = None, None

    def for_prompts(self, prompts: list[str], lora: Path | None) -> list[list[Image.Image | None]]:
        """Images per prompt; None where the output was not finite."""
        if lora is not None and self.loaded != lora:
            self.load(lora)
        if self.loaded is not None:
            (self.pipe.enable_lora if lora is not None else self.pipe.disable_lora)()
        rows = []
        for j, prompt in enumerate(prompts):
            seeds = prompt_seeds(self.config, j)
            common = dict(num_inference_steps=self.config.num_inference_steps,
                          guidance_scale=self.config.guidance_scale)
            arrays = self.pipe([prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                               height=self.size, width=self.size, output_type="np", **common).images
            if self.refiner is not None:
                arrays = self.refiner([prompt] * len(seeds), image=arrays, output_type="np",
                                      generator=[torch.Generator().manual_seed(s) for s in seeds], **common).images
            rows.append([to_image(a) for a in arrays])  # marked, as every image Dreamline generates
            count_images(len(seeds), self.config.num_inference_steps * (2 if self.refiner is not None else 1))
        return rows

    def load(self, lora: Path) -> None:
        """Switch to the LoRA of checkpoint folder `lora`. A LoRA of the same layout as the one loaded (the next
        checkpoint of a training run, another learning rate at the same rank) has its weights copied into the
        adapter already in the pipeline (hot-swap) rather than the adapter removed and injected again. Another
        layout (the champion at another rank), and any LoRA with text-encoder weights, which diffusers cannot
        hot-swap, is loaded afresh once the one before is unloaded; the file says which it is, whatever the
        checkpoint's info says."""
        layout = lora_files.layout(lora / LORA_WEIGHTS)
        text_encoders = any(key.split(".", 1)[0] in lora_files.TEXT_ENCODERS for key, _ in layout)
        hotswap = self.loaded is not None and layout == self.layout and not text_encoders
        if self.loaded is not None and not hotswap:
            self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS,  # the checked file, not a .bin beside it
                                    adapter_name="checkpoint", hotswap=hotswap)
        self.loaded, self.layout = lora, layout


def scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise StepError(f"--scheduler {name!r}: not a diffusers scheduler class")
    return cls


def to_image(array: np.ndarray) -> Image.Image | None:
    """The generated image, with Dreamline's invisible mark; None where the output was not finite."""
    if not np.isfinite(array).all():
        return None
    return mark(Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)))
