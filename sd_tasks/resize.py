"""Resize every captioned image into an SDXL aspect-ratio bucket and record SDXL's micro-conditioning.

A bucket is a (width, height) of about `resolution`² pixels with sides that are multiples of `bucket_step`; each
image goes to the bucket closest to its aspect ratio, is scaled to cover it and center-cropped. SDXL is conditioned
on the original size and the crop's top-left corner, so both are written to the manifest for `encode` and `train`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from sd_tasks.cli import option
from sd_tasks.images import open_rgb
from sd_tasks.storage import read_dir, read_json, write_dir, write_json


@dataclass
class ResizeConfig:
    """Resize and crop captioned images to training buckets; write images/ and manifest.json."""

    captions: str = option("caption's output (URI of the folder holding manifest.json)")
    output: str = option("URI to write the resized images and manifest.json to")
    resolution: int = option("side of the square bucket; other buckets keep about this many pixels", 1024)
    bucket_step: int = option("bucket sides are multiples of this", 64)
    max_aspect_ratio: float = option("widest bucket (long side / short side)", 2.0)


def run(config: ResizeConfig) -> dict:
    manifest = read_json(f"{config.captions}/manifest.json")
    source = read_dir(manifest["source"])
    buckets = aspect_buckets(config.resolution, config.bucket_step, config.max_aspect_ratio)
    records = []
    with write_dir(config.output) as out:
        (out / "images").mkdir()
        for i, item in enumerate(manifest["records"]):
            image = open_rgb(source / item["path"])
            width, height = nearest_bucket(image.size, buckets)
            resized, crop_top_left = cover_and_crop(image, width, height)
            name = f"images/{i:05d}.png"
            resized.save(out / name)
            records.append({
                "file": name, "source": item["path"], "caption": item["caption"],
                "original_size": [image.height, image.width], "crop_top_left": crop_top_left,
                "target_size": [height, width],
            })
        write_json(out / "manifest.json", {"resolution": config.resolution, "records": records})
    return {"manifest": f"{config.output}/manifest.json", "images": len(records),
            "buckets": sorted({f"{r['target_size'][1]}x{r['target_size'][0]}" for r in records})}


def aspect_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of `step`, both orientations."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_ratio:
        height = max(step, int(area / width) // step * step)
        if max(width, height) / min(width, height) <= max_ratio:
            buckets |= {(width, height), (height, width)}
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_and_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, list[int]]:
    """Scale to cover width x height, center-crop; return the image and the crop's (top, left)."""
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.LANCZOS, reducing_gap=3.0)
    top, left = (scaled[1] - height) // 2, (scaled[0] - width) // 2
    return image.crop((left, top, left + width, top + height)), [top, left]
