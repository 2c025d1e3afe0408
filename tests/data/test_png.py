"""sd_tasks.data.png: the PNG files resize writes read back, with any reader that checks them, as exactly the image."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from sd_tasks.data.png import save_png


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 1), (3, 2), (157, 93), (896, 1152)])
def test_pixels_read_back_identical(tmp_path, size):
    width, height = size
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # noise: every byte value, every wrap-around
    pixels[: height // 2, : width // 2] = 255  # and flat areas, where the filtered bytes are 0 or wrap to 128
    save_png(Image.fromarray(pixels), tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as im:
        im.verify()  # chunk CRCs and structure
    with Image.open(tmp_path / "out.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", size)
        assert np.array_equal(np.asarray(im), pixels)


def test_structure_and_average_filter(tmp_path):
    save_png(Image.fromarray(np.full((2, 2, 3), 200, dtype=np.uint8)), tmp_path / "flat.png")
    data = (tmp_path / "flat.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    idat = data.index(b"IDAT")
    rows = zlib.decompress(data[idat + 4:])
    # Average: first row 200 - 0, then 200 - 100 (left / 2); second row 200 - 100 (above / 2), then 200 - 200
    assert rows == bytes([3, 200, 200, 200, 100, 100, 100, 3, 100, 100, 100, 0, 0, 0])


def test_other_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="save_png writes RGB images, not RGBA"):
        save_png(Image.new("RGBA", (2, 2)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
