"""Decode every file of a dataset folder and sort it into accepted and rejected, each rejection with its reason.

The input folder is only read, never modified. The report lists accepted images with their size, format and sha256,
so later steps and the MLflow run can name exactly which files were trained on.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.images import open_rgb
from sd_tasks.storage import read_dir, write_dir, write_json


@dataclass
class ValidateConfig:
    """Check every image in a folder; write report.json with accepted and rejected files."""

    input: str = option("folder of images (URI)")
    output: str = option("URI to write report.json to")
    min_side: int = option("reject images whose shorter side is below this many pixels", 64)
    max_aspect_ratio: float = option("reject images more elongated than this (long side / short side)", 4.0)
    min_images: int = option("fail unless at least this many images are accepted", 1)


def run(config: ValidateConfig) -> dict:
    folder = read_dir(config.input)
    accepted, rejected, seen = [], [], {}
    for path in sorted(p for p in folder.rglob("*") if not p.name.startswith(".")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        record, reason = check_image(path, folder, config)
        if reason is None and record["sha256"] in seen:
            reason = f"exact duplicate of {seen[record['sha256']]}"
        if reason:
            rejected.append({"path": rel, "reason": reason})
        else:
            seen[record["sha256"]] = rel
            accepted.append({"path": rel, **record})
    report = {"source": config.input, "accepted": accepted, "rejected": rejected}
    if len(accepted) < config.min_images:
        reasons = Counter(r["reason"].split(" (")[0] for r in rejected)
        summary = "; ".join(f"{n} {why}" for why, n in reasons.most_common()) or "no files"
        raise StepError(f"{config.input}: {len(accepted)} usable images, need {config.min_images} ({summary})")
    with write_dir(config.output) as out:
        write_json(out / "report.json", report)
    return {"report": f"{config.output}/report.json", "accepted": len(accepted), "rejected": len(rejected)}


def check_image(path: Path, root: Path, config: ValidateConfig) -> tuple[dict, str | None]:
    if path.is_symlink():
        return {}, "symbolic link (only regular files are read)"
    if not path.resolve().is_relative_to(root.resolve()):
        return {}, "path leaves the dataset folder"
    data = path.read_bytes()
    if not data:
        return {}, "empty file"
    try:
        with Image.open(path) as im:
            fmt = im.format
        image = open_rgb(path)
    except Image.DecompressionBombError:
        return {}, f"more than {Image.MAX_IMAGE_PIXELS} pixels"
    except UnidentifiedImageError:
        return {}, "not an image"
    except (OSError, SyntaxError, ValueError) as exc:
        return {}, f"corrupt or truncated image data ({exc})"
    width, height = image.size
    if min(width, height) < config.min_side:
        return {}, f"too small ({width}x{height}, shorter side below {config.min_side})"
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        return {}, f"extreme aspect ratio ({width}x{height})"
    return {"width": width, "height": height, "format": fmt, "sha256": hashlib.sha256(data).hexdigest()}, None
