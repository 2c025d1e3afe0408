"""Opening user images the way training needs them: upright, RGB, alpha flattened onto neutral grey.

Everything that reads a dataset image goes through here, so validate and resize agree on what an image is:

- `open_image` identifies the file and checks its pixel count from the header, before any pixel is allocated;
- `normalise` decodes it, applies the EXIF orientation, converts pixels tagged with another colour profile (Display
  P3 from phones, Adobe RGB, a CMYK press profile) to sRGB and turns any colour mode into 8-bit RGB;
- `open_rgb` is both, with optional JPEG draft decoding for callers that only need a smaller image.

HEIC/HEIF straight from phones decode through pillow-heif (registered below, once per process); pillow 13 reads
AVIF, WebP and TIFF itself.
"""
from __future__ import annotations

import io
import math
import os
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps

pillow_heif.register_heif_opener()  # module import runs once per process; worker processes inherit it

NEUTRAL_GREY = (127, 127, 127)
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 200 MP phone photo needs a higher limit on purpose
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height


class TooManyPixels(ValueError):
    """The header announces more pixels than allowed (a decompression bomb, or simply too big to handle)."""


# The image formats Dreamline decodes (Pillow's names; JPEG's opener also gives phones' MPO). Pillow picks a
# decoder by content, so without this list a PostScript file named .jpg would reach its EPS plugin, which runs
# Ghostscript where one is installed, and dozens of rarely used decoders would be one file away.
FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP", "HEIF", "AVIF")


ISOBMFF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first 16 bytes start like one of FORMATS (read before anything else of it)."""
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
                            b"BM")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or \
        (head[4:8] == b"ftyp" and head[8:12] in ISOBMFF_BRANDS)


def open_image(source: Path | str | BinaryIO | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify an image and check its header size against `max_pixels`; nothing is decoded yet.

    Raises PIL's UnidentifiedImageError for content no plugin recognises, TooManyPixels for too large a header.
    PIL's own process-wide bomb check (a warning above 89 MP, an error above 179 MP) is not what limits us: the
    explicit check below is, with the limit of the caller's config. Its warning is silenced, its error mapped.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=FORMATS)  # never Pillow's other plugins (EPS runs Ghostscript)
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise TooManyPixels(f"header claims more than {limit:,} pixels, PIL's own hard limit") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise TooManyPixels(f"{width}x{height} = {width * height:,} pixels, limit {max_pixels:,}")
    return im


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable)."""
    if im.format not in ("JPEG", "MPO"):
        # PNG and others may keep EXIF after the pixels, and getexif() then decodes them: decode here first, so a
        # decoding error is raised to the caller instead of being taken for bad EXIF below (a failed load is not
        # retried, so it would go unnoticed). Only JPEG decodes at a reduced draft scale, and its EXIF is in front.
        im.load()
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # broken EXIF: decoding the pixels still works, only the orientation is unknown
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone."""
    width, height = im.size
    return (height, width) if orientation(im) in (5, 6, 7, 8) else (width, height)


def draft_for(im: Image.Image, upright_min: tuple[int, int]) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the result still covers `upright_min` (width, height after
    EXIF orientation). libjpeg scales in the DCT, so the whole entropy-coded stream is still read: truncated or
    corrupt data fails exactly as in a full-scale decode. A no-op for every other format."""
    if im.format not in ("JPEG", "MPO"):  # MPO: a phone JPEG carrying a depth map or preview; frame 0 is JPEG
        return
    width, height = upright_min
    if orientation(im) in (5, 6, 7, 8):
        width, height = height, width
    im.draft("RGB", (max(1, width), max(1, height)))


def normalise(im: Image.Image) -> Image.Image:
    """Decode `im` (only its current frame), apply EXIF orientation and return 8-bit sRGB."""
    im.load()
    if orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb(to_srgb(im))


def colour_profile(im: Image.Image) -> str | None:
    """The name of the embedded colour profile when it is not sRGB (None: untagged, sRGB or unreadable)."""
    profile = _embedded_profile(im)
    return ImageCms.getProfileDescription(profile).strip() or "unnamed" if profile else None


def to_srgb(im: Image.Image) -> Image.Image:
    """Convert the pixels of an image tagged with a non-sRGB colour profile to sRGB, what SDXL was trained on and
    what an untagged PNG means (read as sRGB, a Display P3 photo's numbers come out washed out). Untagged images are
    taken to be sRGB already. The result carries no profile, so the PNG that `resize` writes is read as sRGB too."""
    profile = _embedded_profile(im)
    if profile is None:
        return im
    alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
    colour = im.convert({"RGBA": "RGB", "LA": "L"}.get(im.mode, im.mode))
    try:
        out = ImageCms.profileToProfile(colour, profile, _SRGB, outputMode="RGB")
    except ImageCms.PyCMSError:  # the profile does not fit the pixels (say, an RGB profile on a grey image)
        return im
    if alpha is not None:
        out.putalpha(alpha)
    out.info = {k: v for k, v in im.info.items() if k != "icc_profile"}
    return out


_SRGB = ImageCms.createProfile("sRGB")


def _embedded_profile(im: Image.Image) -> ImageCms.ImageCmsProfile | None:
    """The embedded profile, when it is not sRGB and fits the pixels' mode (else the pixels are used as they are)."""
    icc = im.info.get("icc_profile")
    if not icc:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(profile)
        space = profile.profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError, AttributeError):  # a broken profile: the pixels are usable as they are
        return None
    fits = {"RGB": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}.get(space, ())
    return None if "srgb" in name.lower() or im.mode not in fits else profile


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on neutral grey, 16-bit scaled down, CMYK/palette/grey expanded."""
    if im.mode == "RGB":
        return im
    if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, NEUTRAL_GREY + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in SIXTEEN_BIT_MODES:  # 16-bit grey (PNG, TIFF): keep the top 8 bits, 65535 -> 255
        pixels = np.asarray(im).astype(np.uint32)
        return Image.fromarray((pixels * 255 // 65535).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":  # float grey: 0..1 when it looks normalised, else 0..255
        pixels = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(pixels, initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.nan_to_num(pixels * scale).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def open_rgb(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode `path` (frame 0), apply EXIF orientation and return an RGB image.

    With `draft` (width, height after orientation), a JPEG may come back smaller than its full size, but never
    smaller than `draft`; callers that need the true size read it with `upright_size` first.
    """
    with open_image(path, max_pixels) as im:
        if draft:
            draft_for(im, draft)
        return normalise(im)


def perceptual_hash(image: Image.Image) -> int | None:
    """64-bit DCT perceptual hash (pHash) of an image, or None for a (nearly) flat image that has no structure
    to compare. Re-encoding, rescaling and small crops move it by a few bits; different photos of one subject
    differ by 14+ bits (measured on DreamBench). Ten lines of numpy instead of the imagehash package: no new
    dependency (and its scipy/PyWavelets pins) in the image that every step runs in."""
    grey = image.convert("L") if image.mode != "L" else image
    pixels = np.asarray(grey.resize((32, 32), Image.LANCZOS, reducing_gap=2.0), dtype=np.float64)
    if pixels.std() < 2.0:
        return None
    low = (_DCT @ pixels @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


_k = np.arange(32)
_DCT = np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / 64)  # DCT-II basis, unnormalised (only signs matter)


def default_workers() -> int:
    """Worker processes to use: $SD_TASKS_WORKERS, else the CPUs this process may run on, capped by a cgroup CPU
    quota (a Kubernetes CPU limit), where os.cpu_count() would count every core of the node."""
    if os.environ.get("SD_TASKS_WORKERS", "").strip().isdigit() and int(os.environ["SD_TASKS_WORKERS"]) > 0:
        return int(os.environ["SD_TASKS_WORKERS"])
    return usable_cpus()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max, else v1 cfs_quota_us), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def parallel_map(fn: Callable, args: list[tuple], workers: int = 0) -> list:
    """[fn(*a) for a in args], in order: in this process for one worker or one item, else in a process pool.
    Processes, not threads: Pillow lets go of the GIL inside its decoders and resamplers, but not for everything in
    between (opening, EXIF, PNG chunks, the checks), so threads would still queue. `workers` 0: default_workers()."""
    workers = min(workers or default_workers(), len(args))
    if workers <= 1:
        return [fn(*a) for a in args]
    with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
        return list(pool.map(fn, *zip(*args), chunksize=max(1, len(args) // (workers * 8))))


def _worker_init() -> None:
    # The step's SIGTERM handler (sd_tasks.cli) turns SIGTERM into KeyboardInterrupt so the main process can clean
    # up; a worker has nothing to clean up and should simply end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
