"""The invisible mark (sd_tasks.safety.marking): read back after PNG, JPEG at quality 90 and resizes; never found in
an image that was not marked; images below the library's 256x256 floor are left as they are."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from sd_tasks.safety.marking import is_marked, mark, matching_bits

PHOTOS = sorted((REPO / "sample_data").glob("*/*.jpg"))


def reencoded(image: Image.Image, format: str, **options) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [(256, 256), (512, 512), (1024, 768)])
def test_the_mark_survives_png_jpeg_90_and_resizes(size):
    photo = Image.open(PHOTOS[0]).convert("RGB").resize(size)
    marked = mark(photo)
    difference = np.abs(np.asarray(marked, dtype=int) - np.asarray(photo, dtype=int))
    assert 0 < difference.mean() < 2  # invisible: about 40 dB PSNR
    half = marked.resize((size[0] // 2, size[1] // 2), Image.LANCZOS)
    for copy in (reencoded(marked, "PNG"), reencoded(marked, "JPEG", quality=90),
                 half.resize(size, Image.LANCZOS)):
        assert matching_bits(copy) >= 46, copy.size
        assert is_marked(copy)
    if max(size) == 1024:  # a smaller copy of an image at SDXL's generation size is read back at that size
        assert is_marked(marked.resize((size[0] * 3 // 4, size[1] * 3 // 4), Image.LANCZOS))


def test_no_mark_is_found_in_images_that_were_not_marked():
    for path in PHOTOS[::3]:
        for size in ((256, 256), (768, 1024)):
            image = Image.open(path).convert("RGB").resize(size)
            assert not is_marked(image), (path.name, size)
            assert not is_marked(reencoded(image, "JPEG", quality=90))


def test_an_image_below_the_librarys_floor_is_returned_unchanged():
    small = Image.open(PHOTOS[0]).convert("RGB").resize((255, 256))
    assert mark(small) is small and not is_marked(small)
