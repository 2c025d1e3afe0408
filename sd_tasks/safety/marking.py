"""An invisible watermark on every image Dreamline generates, and the check that reads it back.

The `invisible-watermark` package (import name `imwatermark`), which SDXL pipelines in diffusers use, with its
`dwtDctSvd` method rather than diffusers' `dwtDct`: measured on photos at 257 to 1024 px, dwtDct's 48 bits do not
survive a JPEG at quality 90 (21 of 48 read back), dwtDctSvd's do (48 of 48), and both survive PNG and a resize to
half and back; `rivaGan` survives more but takes 6 s per 1024 px image on a CPU. The message is Dreamline's own 48
bits, so a mark says "made by Dreamline", not merely "made by SDXL". diffusers' own mark is switched off where
Dreamline loads a pipeline (`add_watermarker=False`): two marks in one image disturb each other.

The library marks only images of at least 256x256 pixels (65,536): smaller ones (only the tiny test models make them)
are returned unmarked, and the image API says so in its `X-Dreamline-Watermark` header. A reader that is given a
resized copy tries it at its own size first, then at SDXL's generation size (longer side 1024 px).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MESSAGE = b"DRMLN1"  # 48 bits: Dreamline, mark version 1
METHOD = "dwtDctSvd"
MIN_PIXELS = 256 * 256  # the library refuses smaller images
MATCH = 42  # bits of 48 that must agree: an unmarked image agrees on 24 +- 3.5; 42 or more by chance is about 1e-7
GENERATION_SIDE = 1024  # SDXL's: where a reader tries a resized copy


def bgr_array(image: Image.Image) -> np.ndarray:
    """The image as OpenCV reads one (BGR, contiguous), as invisible-watermark and NudeNet take it."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def markable(image: Image.Image) -> bool:
    return image.width * image.height >= MIN_PIXELS


def mark(image: Image.Image) -> Image.Image:
    """`image` (RGB) with Dreamline's mark; unchanged if it is smaller than the library can mark."""
    if not markable(image):
        return image
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", MESSAGE)
    marked = encoder.encode(bgr_array(image), METHOD)
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def matching_bits(image: Image.Image) -> int:
    """How many of the mark's 48 bits `image`, at its own size, agrees on."""
    from imwatermark import WatermarkDecoder

    bits = WatermarkDecoder("bits", len(MESSAGE) * 8).decode(bgr_array(image), METHOD)
    expected = np.unpackbits(np.frombuffer(MESSAGE, dtype=np.uint8))
    return int((np.asarray(bits, dtype=np.uint8) == expected).sum())


def is_marked(image: Image.Image) -> bool:
    """Whether `image` carries Dreamline's mark: as it is, or resized back to SDXL's generation size (its longer
    side 1024 px), the size a downscaled copy of a generated image most likely had."""
    return any(matching_bits(candidate) >= MATCH for candidate in candidates(image))


def candidates(image: Image.Image):
    if markable(image):
        yield image
    if max(image.size) != GENERATION_SIDE:
        scale = GENERATION_SIDE / max(image.size)
        yield image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
