"""Resize every captioned image into an SDXL aspect-ratio bucket and record SDXL's micro-conditioning.

A bucket is a (width, height) of about `resolution`² pixels with sides that are multiples of `bucket_step`; each
image goes to the bucket closest to its aspect ratio, is scaled to cover it and cropped (center, or random with a
per-file seed). With `no_upscale`, an image smaller than the buckets goes to a smaller bucket instead of being
enlarged (kohya's bucket_no_upscale). SDXL is conditioned on the original size and the crop's top-left corner, so
both are written to the manifest for `encode` and `train`, with the scaled size (for mirrored copies' crops).

Speed (bench/prep.py, docs/benchmarks.md): images are resized in a process pool (one worker per available CPU, or
$SD_TASKS_WORKERS); a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers its scaled size
(`Image.draft`), so a 12 MP phone photo is never decoded at full size; PNGs are written by sd_tasks.data.png (one fixed
row filter, zlib's fast run-length strategy: lossless, ~1.8x faster than Pillow's encoder). Sizes, crops and the
manifest are exactly those of a full-scale decode, computed from the header's size; pixel values differ by well
under one grey level on average from resizing the full-scale decode.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import read_dir, write_dir, write_json
from sd_tasks.data.images import DEFAULT_MAX_PIXELS, draft_for, normalise, open_image, parallel_map, upright_size
from sd_tasks.data.manifest import caption_text, inside, load, side
from sd_tasks.data.png import save_png

MAX_RESOLUTION = 2048  # the form's bound (SDXL trains at 1024; beyond this a bucket's image is a memory hazard)


@dataclass
class ResizeConfig:
    """Resize and crop captioned images to training buckets; write images/ and manifest.json."""

    captions: str = option("caption's output (URI of the folder holding manifest.json)")
    output: str = option("URI to write the resized images and manifest.json to")
    resolution: int = option("side of the square bucket; other buckets keep about this many pixels", 1024,
                             at_least=8, at_most=MAX_RESOLUTION)
    bucket_step: int = option("bucket sides are multiples of this", 64, at_least=8, at_most=64)
    max_aspect_ratio: float = option("widest bucket (long side / short side)", 2.0, at_least=1, at_most=4)
    no_upscale: bool = option("never enlarge: small images go to smaller buckets", False)
    crop: str = option("center or random", "center")
    seed: int = option("seed of random crops (each file gets its own, stable across runs)", 0,
                       at_least=0, at_most=2**31 - 1)



def run(config: ResizeConfig) -> dict:
    check(config)
    uri = f"{config.captions}/manifest.json"
    manifest = load(uri, texts=("source",))
    source = read_dir(manifest["source"])
    manifest["records"] = [checked_record(source, item, f"{uri}: records[{i}]")
                           for i, item in enumerate(manifest["records"])]
    buckets = aspect_buckets(config.resolution, config.bucket_step, config.max_aspect_ratio)
    jobs = [(source / item["path"], f"images/{i:05d}.png", pixel_limit(item)) for i, item in
            enumerate(manifest["records"])]
    with write_dir(config.output) as out:
        (out / "images").mkdir()
        cropping = {"no_upscale": config.no_upscale, "crop": config.crop, "seed": config.seed,
                    "bucket_step": config.bucket_step, "max_aspect_ratio": config.max_aspect_ratio}
        results = parallel_map(resize_one, [(src, out / name, buckets, limit, cropping) for src, name, limit in jobs])
        records = [{
            "file": name, "source": item["path"], "caption": item["caption"],
            "original_size": [original[1], original[0]], "crop_top_left": crop_top_left,
            "target_size": [height, width], "scaled_size": [scaled[1], scaled[0]],
        } for item, (_, name, _), (original, (width, height), crop_top_left, scaled) in zip(manifest["records"], jobs,
                                                                                               results)]
        write_json(out / "manifest.json", {"resolution": config.resolution, "records": records})
    return {"manifest": f"{config.output}/manifest.json", "images": len(records),
            "buckets": sorted({f"{r['target_size'][1]}x{r['target_size'][0]}" for r in records})}


def check(config: ResizeConfig) -> None:
    """The bounds the trigger form puts on these settings, for the CLI, which has no form: one line each."""
    if config.crop not in ("center", "random"):
        raise StepError(f"--crop {config.crop!r}: choose center or random")
    if config.bucket_step not in (8, 16, 32, 64):
        raise StepError(f"--bucket-step {config.bucket_step}: one of 8, 16, 32 or 64 (SDXL's VAE works in 8-pixel "
                        f"cells; training buckets use 64)")
    if not config.bucket_step <= config.resolution <= MAX_RESOLUTION or config.resolution % config.bucket_step:
        raise StepError(f"--resolution {config.resolution}: a multiple of --bucket-step {config.bucket_step} from "
                        f"{config.bucket_step} to {MAX_RESOLUTION}")


def checked_record(source: Path, item: dict, where: str) -> dict:
    """A record of caption's manifest: its path inside the source folder, its size sane, its caption text."""
    inside(source, item.get("path"), f"{where}.path")
    for name in ("width", "height"):
        if item.get(name) is not None:
            side(item[name], f"{where}.{name}")
    return {**item, "caption": caption_text(item.get("caption"), f"{where}.caption")}


def pixel_limit(item: dict) -> int:
    """Read what validate accepted, whatever its --max-pixels was: a file now larger than that has changed."""
    return max(DEFAULT_MAX_PIXELS, int(item.get("width") or 0) * int(item.get("height") or 0))


def resize_one(source: Path, target: Path, buckets: list[tuple[int, int]], max_pixels: int = DEFAULT_MAX_PIXELS,
               cropping: dict | None = None):
    """Write `source` resized into its bucket as the PNG `target`; return (original (w, h), bucket (w, h), crop,
    scaled (w, h))."""
    cropping = cropping or {}
    try:
        with open_image(source, max_pixels) as im:
            original = upright_size(im)
            width, height = bucket_for(original, buckets, cropping)
            draft_for(im, cover_size(original, width, height))
            image = normalise(im)
    except (OSError, ValueError, SyntaxError) as exc:  # validated, so changed since: name the file, no traceback
        raise StepError(f"{source}: cannot read image ({exc})") from None
    rng = random.Random(f"{cropping.get('seed', 0)}:{source.name}") if cropping.get("crop") == "random" else None
    resized, crop_top_left = cover_and_crop(image, width, height, original, rng)
    save_png(resized, target)
    return original, (width, height), crop_top_left, cover_size(original, width, height)


def bucket_for(size: tuple[int, int], buckets: list[tuple[int, int]], cropping: dict) -> tuple[int, int]:
    """The nearest bucket; with no_upscale, the nearest among smaller buckets that the image covers unscaled."""
    bucket = nearest_bucket(size, buckets)
    step = cropping.get("bucket_step", 64)
    resolution = int(math.sqrt(bucket[0] * bucket[1]))
    while cropping.get("no_upscale") and cover_scale(size, *bucket) > 1 and resolution > step:
        resolution -= step
        bucket = nearest_bucket(size, aspect_buckets(resolution, step, cropping.get("max_aspect_ratio", 2.0)))
    return bucket


def cover_scale(size: tuple[int, int], width: int, height: int) -> float:
    return max(width / size[0], height / size[1])


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


def cover_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The size an image of `size` is scaled to so that it covers width x height."""
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def cover_and_crop(image: Image.Image, width: int, height: int, original_size: tuple[int, int] | None = None,
                   rng: random.Random | None = None) -> tuple[Image.Image, list[int]]:
    """Scale to cover width x height, crop (centered, or where `rng` says); return the image and the crop's
    (top, left).

    `original_size` is the true size when `image` was decoded smaller (JPEG draft): the scaled size, and so the
    crop, are computed from it, exactly as for a full-size decode.
    """
    scaled = cover_size(original_size or image.size, width, height)
    image = image.resize(scaled, Image.LANCZOS, reducing_gap=3.0)
    top, left = (scaled[1] - height) // 2, (scaled[0] - width) // 2
    if rng is not None:
        top, left = rng.randint(0, scaled[1] - height), rng.randint(0, scaled[0] - width)
    return image.crop((left, top, left + width, top + height)), [top, left]
