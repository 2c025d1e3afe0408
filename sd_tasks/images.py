"""Opening user images the way training needs them: upright, RGB, alpha flattened onto neutral grey."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 64_000_000  # beyond this PIL raises DecompressionBombError before allocating pixels

NEUTRAL_GREY = (127, 127, 127)


def open_rgb(path: Path) -> Image.Image:
    """Fully decode `path`, apply EXIF orientation and return an RGB image."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, NEUTRAL_GREY + (255,))
            return Image.alpha_composite(background, im).convert("RGB")
        if im.mode == "I;16" or im.mode.startswith("I;16") or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit before RGB
        return im.convert("RGB")
