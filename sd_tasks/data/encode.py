"""Encode the prepared images once, so training never runs the VAE or the text encoders per step.

For every image: the VAE's latent distribution (mean and log-variance, so the trainer still samples a fresh latent
each step as the reference script does) and both text encoders' conditioning for its caption, optionally for a
horizontally flipped copy too.

The cache is content-addressed. Its key hashes the prepared images and their captions and sizes, the base model,
the dtype and the flip setting, and it lives at `<output>/<key>/`: a rerun with the same inputs finds its shard
already there and does no work. Large sets are encoded as shards (`--shard-index i --num-shards n`, one process or
pod each) and joined by `merge-cache`; with one shard, `encode` writes the joined manifest itself.

    <output>/<key>/shard-00000-of-00003/latents.safetensors   tensors "<n>.latent_moments", "<n>.prompt_embeds", ...
    <output>/<key>/shard-00000-of-00003/records.json          one record per image (and flipped copy)
    <output>/<key>/manifest.json                              scaling factor, shard list, all records in order
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import IncompleteFolder, StepError
from sd_tasks.core.storage import is_whole, join, read_dir, read_json, why_not_whole, write_dir, write_file, write_json
from sd_tasks.data.manifest import inside, load, resized_record

FORMAT_VERSION = 1  # bump when what is cached changes meaning
DTYPES = ("float32", "float16", "bfloat16")
MAX_SHARDS = 1024  # Airflow's [core] max_map_length: one mapped task per shard


@dataclass
class EncodeConfig:
    """Encode resized images (VAE latents) and captions (both SDXL text encoders) into a content-addressed cache."""

    images: str = option("resize's output (URI of the folder holding manifest.json and images/)")
    output: str = option("cache root (URI); the cache goes to <output>/<key>/")
    base_model: str = option("SDXL pipeline: model id or local diffusers folder")
    batch_size: int = option("images per VAE / text-encoder batch", 8, at_least=1, at_most=1024)
    flip: bool = option("also encode a horizontally flipped copy of every image", False)
    dtype: str = option(f"dtype of the cached tensors: {', '.join(DTYPES)}", "float32")
    shard_index: int = option("which shard this process encodes (0-based)", 0, at_least=0, below=MAX_SHARDS)
    num_shards: int = option("number of shards the records are split into", 1, at_least=1, at_most=MAX_SHARDS)


def run(config: EncodeConfig) -> dict:
    if config.dtype not in DTYPES:
        raise StepError(f"--dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    if not 0 <= config.shard_index < config.num_shards:
        raise StepError(f"--shard-index {config.shard_index} is outside 0..{config.num_shards - 1}")
    uri = f"{config.images}/manifest.json"
    manifest = load(uri)
    folder = read_dir(config.images)
    for i, record in enumerate(manifest["records"]):  # before any model loads: a bad record costs nothing
        where = f"{uri}: records[{i}]"
        inside(folder, record.get("file"), f"{where}.file")
        manifest["records"][i] = resized_record(record, where)
    key = cache_key(folder, manifest, config)
    cache = join(config.output, key)
    shard = shard_name(config.shard_index, config.num_shards)
    records = shard_records(manifest["records"], config.shard_index, config.num_shards)
    cached = is_whole(join(cache, shard))
    if not cached:
        with write_dir(join(cache, shard)) as out:
            encode_records(folder, records, config, out)
    if config.num_shards == 1:
        merge(MergeConfig(cache=cache, num_shards=1))
    return {"cache": cache, "key": key, "shard": shard, "cached": cached, "encoded": 0 if cached else len(records)}


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def shard_records(records: list[dict], index: int, count: int) -> list[dict]:
    """Contiguous slices, so joining the shards in order gives back the records in order."""
    size = -(-len(records) // count)
    return records[index * size:(index + 1) * size]


def cache_key(folder: Path, manifest: dict, config: EncodeConfig) -> str:
    from sd_tasks.data.dataset import content_hash

    described = {
        "format": FORMAT_VERSION,
        "images": content_hash(folder / "images"),
        "records": [{k: r[k] for k in ("file", "caption", "original_size", "crop_top_left", "target_size")}
                    for r in manifest["records"]],
        "model": model_fingerprint(config.base_model),
        "dtype": config.dtype,
        "flip": config.flip,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def model_fingerprint(base_model: str, with_unet: bool = False, parts: list[str] | None = None) -> str:
    """A hub id names its weights. A local folder may be rewritten in place, so fingerprint the parts encode uses by
    content: every file's path, size and the sha256 of its first and last MiB (hashing SDXL's gigabytes of weights
    would cost more than the encode). Path-independent, so two clones agree on the key."""
    path = Path(base_model)
    if not path.is_dir():
        return base_model
    digest = hashlib.sha256()
    parts = parts or (["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
                      + ["unet", "scheduler"] * with_unet)
    for sub in parts:
        for f in sorted((path / sub).rglob("*")):
            if f.is_file():
                size = f.stat().st_size
                with open(f, "rb") as handle:
                    head = handle.read(2**20)
                    handle.seek(max(0, size - 2**20))
                    tail = handle.read(2**20)
                digest.update(f"{f.relative_to(path)}:{size}:".encode() + hashlib.sha256(head + tail).digest())
    return f"local:{digest.hexdigest()}"


def encode_records(folder: Path, records: list[dict], config: EncodeConfig, out: Path) -> None:
    import torch
    from PIL import Image, ImageOps
    from safetensors.torch import save_file

    from sd_tasks.models import loading

    dev = loading.device()
    vae = loading.load_vae(config.base_model).to(dev).eval()  # fp32: SDXL's VAE overflows in fp16
    tokenizers, encoders = loading.load_text_encoders(config.base_model)
    encoders = tuple(e.to(dev) for e in encoders)
    dtype = getattr(torch, config.dtype)

    items = []  # (record, PIL image) for every image and flipped copy
    for r in records:
        image = Image.open(folder / r["file"]).convert("RGB")
        items.append(({**r, "flipped": False}, image))
        if config.flip:
            items.append(({**r, "flipped": True, "crop_top_left": flipped_crop(r)}, ImageOps.mirror(image)))

    tensors, written = {}, []
    for batch in batches_by_size(items, config.batch_size):
        pixels = torch.stack([to_tensor(image) for _, image in batch]).to(dev)
        with torch.no_grad():
            moments = vae.encode(pixels).latent_dist.parameters  # (batch, 2 * latent channels, h/8, w/8)
        prompt_embeds, pooled = loading.encode_prompts(tokenizers, encoders, [r["caption"] for r, _ in batch])
        for j, (record, _) in enumerate(batch):
            if not all(torch.isfinite(t.to(dtype)).all() for t in (moments[j], prompt_embeds[j], pooled[j])):
                # one such latent turns the first training step that draws it into NaN: refuse it here, by name
                raise StepError(f"{record.get('source', record['file'])}: encoding gave values that are not finite "
                                f"(in {config.dtype}); leave the image out or cache in float32")
            name = f"{record['file']}{'#flipped' if record['flipped'] else ''}"
            tensors |= {f"{name}.latent_moments": moments[j], f"{name}.prompt_embeds": prompt_embeds[j],
                        f"{name}.pooled_prompt_embeds": pooled[j]}
            written.append({**record, "key": name})
    written.sort(key=lambda r: (r["file"], r["flipped"]))
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}, out / "latents.safetensors")
    write_json(out / "records.json", {"records": written, "scaling_factor": vae.config.scaling_factor})


def batches_by_size(items: list, batch_size: int):
    """Batches of images of one size (one bucket), in input order within each size."""
    by_size: dict[tuple, list] = {}
    for item in items:
        by_size.setdefault(item[1].size, []).append(item)
    for group in by_size.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def flipped_crop(record: dict) -> list[int]:
    """SDXL's crop_top_left for the mirrored image: the crop's left edge measured from the other side."""
    top, left = record["crop_top_left"]
    scaled_width = record.get("scaled_size", [None, None])[1]
    if scaled_width is None:  # manifests from before resize recorded its scaled size: center crops are symmetric
        return [top, left]
    return [top, scaled_width - record["target_size"][1] - left]


def to_tensor(image):
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class MergeConfig:
    """Join the shards of an encode cache into one manifest (after every `encode --shard-index` finished)."""

    cache: str = option("the cache folder (URI) that encode returned, <output>/<key>")
    num_shards: int = option("how many shards encode was split into", at_least=1, at_most=MAX_SHARDS)


def merge(config: MergeConfig) -> dict:
    records, scaling_factor, shards = [], None, []
    for index in range(config.num_shards):
        shard = shard_name(index, config.num_shards)
        if problem := why_not_whole(join(config.cache, shard)):
            raise IncompleteFolder(f"{join(config.cache, shard)}: {problem}; its encode task must run again")
        part = read_json(join(config.cache, shard, "records.json"))
        scaling_factor = part["scaling_factor"]
        records += [{**r, "shard": shard} for r in part["records"]]
        shards.append(shard)
    manifest = {"format": FORMAT_VERSION, "scaling_factor": scaling_factor, "shards": shards, "records": records}
    write_file(join(config.cache, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return {"cache": config.cache, "shards": len(shards), "records": len(records)}
