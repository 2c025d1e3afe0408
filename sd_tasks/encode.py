"""Encode the prepared images once, so training never runs the VAE or the text encoders per step.

For every image: the VAE's latent distribution (mean and log-variance, so the trainer still samples a fresh latent
each step as the reference script does) and both text encoders' conditioning for its caption. Written as one
safetensors file plus a manifest carrying the SDXL time ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from sd_tasks import models
from sd_tasks.cli import option
from sd_tasks.storage import read_dir, read_json, write_dir, write_json


@dataclass
class EncodeConfig:
    """Encode resized images (VAE latents) and captions (both SDXL text encoders) into a cache."""

    images: str = option("resize's output (URI of the folder holding manifest.json and images/)")
    output: str = option("URI to write cache.safetensors and manifest.json to")
    base_model: str = option("SDXL pipeline: model id or local diffusers folder")


@torch.no_grad()
def run(config: EncodeConfig) -> dict:
    folder = read_dir(config.images)
    manifest = read_json(f"{config.images}/manifest.json")
    dev = models.device()
    vae = models.load_vae(config.base_model).to(dev).eval()  # fp32: SDXL's VAE overflows in fp16
    tokenizers, encoders = models.load_text_encoders(config.base_model)
    encoders = tuple(e.to(dev) for e in encoders)
    tensors, records = {}, []
    for i, item in enumerate(manifest["records"]):
        pixels = to_tensor(Image.open(folder / item["file"]).convert("RGB")).to(dev)
        moments = vae.encode(pixels[None]).latent_dist.parameters[0]  # (2 * latent channels, h/8, w/8)
        prompt_embeds, pooled = models.encode_prompts(tokenizers, encoders, [item["caption"]])
        tensors |= {f"{i}.latent_moments": moments.cpu(), f"{i}.prompt_embeds": prompt_embeds[0].cpu(),
                    f"{i}.pooled_prompt_embeds": pooled[0].cpu()}
        records.append({**item, "key": str(i)})
    with write_dir(config.output) as out:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / "cache.safetensors")
        write_json(out / "manifest.json", {
            "base_model": config.base_model, "scaling_factor": vae.config.scaling_factor,
            "shift_factor": getattr(vae.config, "shift_factor", None), "records": records,
        })
    return {"cache": config.output, "encoded": len(records)}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
