"""Class images for DreamBooth's prior preservation: what the base model draws for the class prompt ("a photo of a
dog"), trained on beside the subject so the LoRA does not turn every dog into *this* dog.

Generated once and cached by everything that decides them (model, prompt, count, seed, resolution, sampler
settings): `<output>/<key>/` holds images/ and a manifest in resize's format, so `encode` takes it as it is.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from sd_tasks.core.config import option
from sd_tasks.core.cost import count_images
from sd_tasks.core.storage import is_whole, join, write_dir, write_json
from sd_tasks.data.encode import model_fingerprint
from sd_tasks.models.loading import inference_dtype, load_pipeline
from sd_tasks.safety.marking import MESSAGE, mark


@dataclass
class ClassImagesConfig:
    """Generate (or find cached) class images for prior preservation."""

    base_model: str = option("SDXL pipeline: model id or local diffusers folder")
    class_prompt: str = option("prompt for the class, e.g. 'a photo of a dog'")
    output: str = option("cache root (URI); the images go to <output>/<key>/")
    count: int = option("number of class images (the reference script's default is 100)", 100,
                        at_least=1, at_most=10_000)
    resolution: int = option("image side in pixels", 1024, at_least=64, at_most=2048)
    seed: int = option("image k uses seed + k", 0, at_least=0, at_most=2**31 - 1)
    num_inference_steps: int = option("denoising steps", 25, at_least=1, at_most=200)
    guidance_scale: float = option("classifier-free guidance scale", 5.0, at_least=0, at_most=50)
    batch_size: int = option("images per pipeline call", 4, at_least=1, at_most=64)
    dtype: str = option("pipeline dtype: auto (float16 on a CUDA GPU, float32 on the CPU), float16, bfloat16, "
                        "float32", "auto")
    vae: str | None = option("VAE to decode with instead of the base model's (e.g. madebyollin/sdxl-vae-fp16-fix)",
                             None)


def run(config: ClassImagesConfig) -> dict:
    config = replace(config, dtype=inference_dtype(config.dtype))  # the cache key names the dtype that ran
    settings = {k: v for k, v in asdict(config).items() if k not in ("output", "batch_size", "base_model")}
    settings["vae"] = config.vae and model_fingerprint(config.vae, parts=[""])  # a local folder by its content
    settings["mark"] = MESSAGE.decode()  # images cached before they were marked are made again
    key = hashlib.sha256(json.dumps({**settings, "model": model_fingerprint(config.base_model, with_unet=True)},
                                    sort_keys=True).encode()).hexdigest()[:20]
    uri = join(config.output, key)
    cached = is_whole(uri)
    if not cached:
        with write_dir(uri) as out:
            generate(config, out)
    return {"images": uri, "key": key, "count": config.count, "cached": cached}


def generate(config: ClassImagesConfig, out) -> None:
    import torch

    pipe = load_pipeline(config.base_model, config.dtype, config.vae)
    (out / "images").mkdir()
    size, records = config.resolution, []
    for start in range(0, config.count, config.batch_size):
        seeds = list(range(config.seed + start, config.seed + min(start + config.batch_size, config.count)))
        images = pipe([config.class_prompt] * len(seeds), height=size, width=size,
                      generator=[torch.Generator().manual_seed(s) for s in seeds],
                      num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale).images
        count_images(len(seeds), config.num_inference_steps)
        for seed, image in zip(seeds, images):
            name = f"images/{seed - config.seed:05d}.png"
            mark(image).save(out / name)  # generated: marked like every image Dreamline makes
            records.append({"file": name, "source": f"seed-{seed}", "caption": config.class_prompt,
                            "original_size": [size, size], "crop_top_left": [0, 0], "target_size": [size, size]})
    write_json(out / "manifest.json", {"resolution": size, "records": records})
