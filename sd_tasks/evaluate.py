"""Evaluate one LoRA checkpoint: generate fixed-seed images for a prompt set and score them.

The seeds depend only on the prompt index and image index, so every checkpoint of every learning rate is judged on
the same starting noise and their images compare side by side. Scores and images go to the checkpoint's training
run in MLflow, stepped by the checkpoint's step, so the UI plots them against step for every learning rate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sd_tasks import tracking
from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.metrics import ClipEmbedder, DinoEmbedder, mean_matched_cosine, mean_pairwise_cosine
from sd_tasks.models import device
from sd_tasks.storage import read_dir, read_json, write_dir, write_json
from sd_tasks.train import CHECKPOINT_INFO


@dataclass
class EvaluateConfig:
    """Generate images with a LoRA checkpoint for fixed prompts and seeds; score CLIP-T, CLIP-I and DINO."""

    checkpoint: str = option("a checkpoint-<step> folder written by train (URI)")
    output: str = option("URI to write images/ and metrics.json to")
    instance_images: str = option("resize's output: the real subject images to compare with (URI)")
    prompts: list[str] = option("evaluation prompts, literal")
    clip_model: str = option("CLIP model id or folder", "openai/clip-vit-large-patch14")
    dino_model: str = option("DINO ViT model id or folder", "facebook/dino-vits16")
    base_model: str | None = option("SDXL pipeline (default: the one the checkpoint was trained on)", None)
    images_per_prompt: int = option("images per prompt", 2)
    num_inference_steps: int = option("denoising steps", 25)
    guidance_scale: float = option("classifier-free guidance scale", 5.0)
    resolution: int | None = option("image side (default: the UNet's native size)", None)
    seed: int = option("base seed; image k of prompt j uses seed + 1000 * j + k", 0)


def run(config: EvaluateConfig) -> dict:
    checkpoint = read_dir(config.checkpoint)
    info = read_json(f"{config.checkpoint}/{CHECKPOINT_INFO}")
    base_model = config.base_model or info["base_model"]
    generated = generate(base_model, checkpoint, config)
    real = load_instance_images(config.instance_images)
    scores = score(generated, config.prompts, real, config)
    result = {"step": info["step"], "learning_rate": info["learning_rate"], "run_id": info["run_id"],
              "checkpoint": config.checkpoint, **scores}
    with write_dir(config.output) as out:
        (out / "images").mkdir()
        for j, images in enumerate(generated):
            for k, image in enumerate(images):
                image.save(out / "images" / f"p{j:02d}-{k}.png")
        write_json(out / "metrics.json", {**result, "prompts": config.prompts})
    log_to_mlflow(info["run_id"], info["step"], scores, generated, config.prompts)
    return result


def generate(base_model: str, checkpoint: Path, config: EvaluateConfig) -> list[list[Image.Image]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_model).to(device())
    pipe.load_lora_weights(str(checkpoint))
    pipe.set_progress_bar_config(disable=True)
    size = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for j, prompt in enumerate(config.prompts):
        seeds = [config.seed + 1000 * j + k for k in range(config.images_per_prompt)]
        images.append(pipe(
            [prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            height=size, width=size,
        ).images)
    return images


def load_instance_images(uri: str) -> list[Image.Image]:
    folder = read_dir(uri)
    manifest = read_json(f"{uri}/manifest.json")
    images = [Image.open(folder / r["file"]).convert("RGB") for r in manifest["records"]]
    if not images:
        raise StepError(f"{uri}: no instance images to compare with")
    return images


def score(generated: list[list[Image.Image]], prompts: list[str], real: list[Image.Image],
          config: EvaluateConfig) -> dict:
    flat = [image for images in generated for image in images]
    flat_prompts = [p for p, images in zip(prompts, generated) for _ in images]
    clip, dino = ClipEmbedder(config.clip_model), DinoEmbedder(config.dino_model)
    clip_generated = clip.images(flat)
    return {
        "clip_t": mean_matched_cosine(clip_generated, clip.texts(flat_prompts)),
        "clip_i": mean_pairwise_cosine(clip_generated, clip.images(real)),
        "dino": mean_pairwise_cosine(dino.images(flat), dino.images(real)),
    }


def log_to_mlflow(run_id: str, step: int, scores: dict, generated, prompts: list[str]) -> None:
    """Stepped metrics and one image row per prompt on the training run, without reopening (and so without
    changing the status of) that run."""
    client = tracking.client()
    for name, value in scores.items():
        client.log_metric(run_id, f"eval/{name}", value, step=step)
    for j, images in enumerate(generated):
        client.log_image(run_id, image_row(images), key=f"eval/prompt-{j:02d}", step=step)
    client.log_text(run_id, json.dumps(prompts, indent=1), "eval/prompts.json")


def image_row(images: list[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        row.paste(image, (x, 0))
        x += image.width
    return row
