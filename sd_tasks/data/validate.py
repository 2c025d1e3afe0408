"""Decode every file of a dataset folder and sort it into accepted and rejected, each rejection with its reason.

The input folder is only read, never modified. The report lists accepted images with their size (after EXIF
orientation), format and sha256, so later steps and the MLflow run can name exactly which files were trained on.

Each file goes through one check after another and stops at the first that fails:

    name       control characters in the path (a newline or NUL that every later manifest reader refuses)
    link       symbolic links (to files or folders) and anything whose real path leaves the dataset folder
    file       not a regular file (FIFO, socket, device), or empty
    sniff      its first bytes are no accepted format's (JPEG, PNG, GIF, TIFF, BMP, WebP, HEIF, AVIF), or it is larger
               than `max_file_mb`: rejected before the rest is read, so a phone video costs 16 bytes of memory
    identify   not an image, whatever its extension (content decides, so a JPEG named .png is a JPEG); only the
               accepted formats' decoders are ever used (never Pillow's EPS plugin, which runs Ghostscript)
    pixels     the header announces more than `max_pixels`: rejected before any pixel is allocated
    animation  more than one frame: rejected, or frame 0 used and noted (`animated`)
    decode     every byte of the image data decoded (an animation: frame 0): truncated or corrupt data fails here;
               a JPEG at a reduced DCT scale, which reads and checks exactly the same bytes (see `decode`)
    size       shorter side below `min_side`, or longer / shorter side above `max_aspect_ratio`
    duplicate  same bytes as, or a perceptual hash within `near_duplicate_distance` bits of, an earlier file
    screen     the accepted images, through the screen (sd_tasks.safety.screening): a flagged photo is quarantined
               (rejected with the screen's reason, the rest trained on) or, with `--screen-policy refuse`, the
               whole folder refused in one line

What is merely unusual is accepted and normalised the way `resize` will read it (sd_tasks.data.images): EXIF
orientation, colour profiles other than sRGB (converted), CMYK, 16-bit, palette, alpha (onto neutral grey),
grayscale, WebP, TIFF, HEIC/HEIF, AVIF, lying extensions, non-ASCII and spaced names. Files are checked in a process
pool; duplicates are decided afterwards in sorted path order, so the first of a group is the one kept and the result
never depends on the pool.

Hidden files and folders (a leading dot: .DS_Store, .git) are skipped.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.data.images import (ALPHA_MODES, DEFAULT_MAX_PIXELS, TooManyPixels, colour_profile, draft_for,
                             looks_like_image, normalise, open_image, open_rgb, orientation, parallel_map,
                             perceptual_hash, upright_size)
from sd_tasks.core.storage import read_dir, write_dir, write_json
from sd_tasks.data.manifest import CONTROL
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, SCREEN_HELP, load_screen

ANIMATION_POLICIES = ("first-frame", "reject")
SCREEN_POLICIES = ("quarantine", "refuse")

MAX_FILE_MB = 200  # a 100 MP 16-bit TIFF is about 600 MB; a phone photo 2 to 20 MB

# A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that leaves both sides at least this long: plenty for
# the 32x32 perceptual hash (a 12 MP photo: 1/8, 504x378). 0 decodes at full scale.
DRAFT_SIDE = 256


@dataclass
class ValidateConfig:
    """Check every image in a folder; write report.json with accepted and rejected files."""

    input: str = option("folder of images (URI)")
    output: str = option("URI to write report.json to")
    min_side: int = option("reject images whose shorter side is below this many pixels", 64, at_least=1, at_most=16384)
    max_aspect_ratio: float = option("reject images more elongated than this (long side / short side)", 4.0,
                                     at_least=1, at_most=100)
    max_pixels: int = option("reject images whose header announces more pixels (decompression bombs), checked "
                             "before decoding", DEFAULT_MAX_PIXELS, at_least=1, at_most=1_000_000_000)
    max_file_mb: float = option("reject files larger than this many MB before reading them", MAX_FILE_MB,
                                above=0, at_most=100_000)
    animated: str = option(f"animated images (GIF, WebP, APNG, multi-frame): {' or '.join(ANIMATION_POLICIES)}",
                           "first-frame")
    near_duplicate_distance: int = option("reject an image whose 64-bit perceptual hash is within this many bits "
                                          "of an accepted one; -1 turns the check off", 8, at_least=0, at_most=64)
    min_images: int = option("fail unless at least this many images are accepted (0: never)", 1, at_least=0,
                             at_most=100_000)
    workers: int = option("processes that decode in parallel; 0: one per available CPU", 0, at_least=0, at_most=1024)
    screen: str = option(SCREEN_HELP, "nudenet")
    screen_threshold: float = option("detector score from which a photo is flagged", DEFAULT_THRESHOLD, above=0,
                                     at_most=1)
    screen_policy: str = option(f"a flagged photo: {' or '.join(SCREEN_POLICIES)} (the whole folder)", "quarantine")

    def __post_init__(self):
        if self.animated not in ANIMATION_POLICIES:
            raise StepError(f"--animated {self.animated!r}: choose one of {', '.join(ANIMATION_POLICIES)}")
        if self.screen_policy not in SCREEN_POLICIES:
            raise StepError(f"--screen-policy {self.screen_policy!r}: choose one of {', '.join(SCREEN_POLICIES)}")


class Rejected(Exception):
    """A file fails a check: `check` is the short category counted in the summary, `reason` the report's text."""

    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check, self.reason = check, reason


def run(config: ValidateConfig) -> dict:
    folder = read_dir(config.input)
    paths, rejected = list_files(folder)
    results = check_all(paths, folder, config)
    rejected += [r for r in results if "reason" in r]
    accepted, duplicates = find_duplicates([r for r in results if "reason" not in r], config.near_duplicate_distance)
    accepted, flagged = screen_photos(folder, accepted, config)
    rejected = sorted(rejected + duplicates + flagged, key=lambda r: r["path"])
    report = {
        "source": config.input,
        "settings": {k: v for k, v in asdict(config).items() if k not in ("input", "output", "workers")},
        "accepted": accepted,
        "rejected": [{"path": r["path"], "reason": r["reason"]} for r in rejected],
    }
    if len(accepted) < config.min_images:
        reasons = Counter(r["check"] for r in rejected)
        summary = "; ".join(f"{n} {why}" for why, n in reasons.most_common()) or \
            ("nothing rejected" if accepted else "no files")
        raise StepError(f"{config.input}: {len(accepted)} usable images, need {config.min_images} ({summary})")
    with write_dir(config.output) as out:
        write_json(out / "report.json", report)
    return {"report": f"{config.output}/report.json", "accepted": len(accepted), "rejected": len(rejected)}


def screen_photos(folder: Path, accepted: list[dict], config: ValidateConfig) -> tuple[list[dict], list[dict]]:
    """The accepted records the screen passes, and the rejections of those it flags (refused: one line)."""
    screen = load_screen(config.screen, config.screen_threshold)
    reasons = {r["path"]: screen.reason(open_rgb(folder / r["path"], config.max_pixels, draft=(DRAFT_SIDE,) * 2))
               for r in accepted}
    flagged = {path: reason for path, reason in reasons.items() if reason}
    if flagged and config.screen_policy == "refuse":
        path, reason = next(iter(flagged.items()))
        raise StepError(f"{config.input}: the screen flagged {len(flagged)} photos ({path}: {reason}); "
                        f"--screen-policy refuse")
    return ([r for r in accepted if r["path"] not in flagged],
            [{"path": path, "check": "screen", "reason": f"flagged by the screen ({reason}): quarantined, not "
                                                         f"trained on"} for path, reason in flagged.items()])


def list_files(folder: Path) -> tuple[list[Path], list[dict]]:
    """Every non-hidden entry under `folder`, without following symbolic links; linked folders are rejected here."""
    paths, rejected = [], []
    for top, dirs, files in os.walk(folder, followlinks=False):
        top = Path(top)
        for name in list(dirs):
            if name.startswith("."):
                dirs.remove(name)
            elif (top / name).is_symlink():
                dirs.remove(name)
                rejected.append({"path": (top / name).relative_to(folder).as_posix(), "check": "symbolic link",
                                 "reason": "symbolic link to a folder (not followed)"})
        paths += [top / name for name in files if not name.startswith(".")]
    return sorted(paths), rejected


def check_all(paths: list[Path], folder: Path, config: ValidateConfig) -> list[dict]:
    """check_file over `paths`, in order, in a process pool of `config.workers`."""
    return parallel_map(check_file, [(path, folder, config) for path in paths], config.workers)


def check_file(path: Path, root: Path, config: ValidateConfig, draft_side: int = DRAFT_SIDE) -> dict:
    """One file through every per-file check: its accepted record (with `phash`), or `check` and `reason`.
    `draft_side`: see DRAFT_SIDE (0: every JPEG at full scale, which gives the same verdicts, only slower)."""
    rel = path.relative_to(root).as_posix()
    try:
        if CONTROL.search(rel):
            raise Rejected("control characters in name", "file name contains control characters")
        data = read_regular_file(path, root, int(config.max_file_mb * 2**20))
        im = identify(data, config.max_pixels)
        with im:  # closes the file pointer only; the decoded image stays usable
            frame_note = select_frame(im, config.animated)
            image, size = decode(im, draft_side)
            notes = [note for note in (frame_note, extension_note(path, im.format), orientation_note(im),
                                       mode_note(im), profile_note(im)) if note]
            fmt = im.format
        check_size(size, config)
    except Rejected as rejection:
        return {"path": rel, "check": rejection.check, "reason": rejection.reason}
    record = {"path": rel, "width": size[0], "height": size[1], "format": fmt,
              "sha256": hashlib.sha256(data).hexdigest(), "phash": perceptual_hash(image)}
    if notes:
        record["notes"] = notes
    return record


def read_regular_file(path: Path, root: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file inside `root`; links, special files, empty files, files that do not start like
    an accepted image format and files larger than `max_bytes` are rejected, before the rest is read."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        where = "points outside the dataset folder" if not target.is_relative_to(root.resolve()) else \
            "only regular files are read"
        raise Rejected("symbolic link", f"symbolic link ({where})")
    if not path.resolve().is_relative_to(root.resolve()):
        raise Rejected("outside the dataset folder", "path leaves the dataset folder")
    if not stat.S_ISREG(info.st_mode):
        raise Rejected("not a regular file", "not a regular file (FIFO, socket or device)")
    # O_NOFOLLOW: a file swapped for a link after the checks above is still not followed; O_NONBLOCK: nor does a
    # file swapped for a FIFO block the step.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:  # no permission, gone since the listing: the file's own problem, not the step's
        raise Rejected("unreadable", f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Rejected("not a regular file", "not a regular file (FIFO, socket or device)")
        if not info.st_size:
            raise Rejected("empty file", "empty file")
        head = f.read(16)
        if not looks_like_image(head):
            raise Rejected("not an image", "not an image")  # no accepted format starts like it
        if info.st_size > max_bytes:
            raise Rejected("too large", f"{info.st_size / 2**20:.0f} MB, larger than --max-file-mb "
                                        f"{max_bytes / 2**20:g}")
        data = head + f.read(max_bytes + 1 - len(head))  # a file that grew since fstat is cut at the limit
    if len(data) > max_bytes:
        raise Rejected("too large", f"larger than --max-file-mb {max_bytes / 2**20:g}")
    return data


def identify(data: bytes, max_pixels: int) -> Image.Image:
    """Open the bytes as an image (content decides, not the extension) and check the header's pixel count."""
    try:
        return open_image(data, max_pixels)
    except TooManyPixels as exc:
        raise Rejected("too many pixels", f"too many pixels ({exc}): possible decompression bomb") from None
    except UnidentifiedImageError:  # it starts like an accepted format (read_regular_file): a damaged image
        raise Rejected("corrupt or truncated", "corrupt or truncated image data (unreadable header)") from None
    except Exception as exc:  # a plugin choking on a damaged header
        raise Rejected("corrupt or truncated", f"corrupt or truncated image data ({_first_line(exc)})") from None


def select_frame(im: Image.Image, policy: str) -> str | None:
    """Reject an animation, or keep frame 0 (the current frame after open) and say so."""
    frames = getattr(im, "n_frames", 1)
    if im.format == "MPO":  # a phone JPEG with extra pictures (depth map, preview): frame 0 is the photo
        return None
    if frames <= 1 or not getattr(im, "is_animated", frames > 1):
        return None
    if policy == "reject":
        raise Rejected("animated", f"animated ({frames} frames), a still image is needed")
    return f"animated ({frames} frames): frame 0 used"


def orientation_note(im: Image.Image) -> str | None:
    turn = orientation(im)
    return f"EXIF orientation {turn} applied" if turn != 1 else None


def mode_note(im: Image.Image) -> str | None:
    if im.mode == "RGB":
        return None
    alpha = im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)
    return f"{im.mode} converted to RGB" + (", alpha composited on grey" if alpha else "")


def profile_note(im: Image.Image) -> str | None:
    name = colour_profile(im)
    return f"colour profile {name!r} converted to sRGB" if name else None


def extension_note(path: Path, fmt: str | None) -> str | None:
    """A note when the extension names another format than the content (accepted: the content decides)."""
    claimed = Image.registered_extensions().get(path.suffix.lower())
    if claimed and fmt and claimed != fmt and {claimed, fmt} != {"JPEG", "MPO"}:
        return f"content is {fmt}, extension {path.suffix} says {claimed}"
    return None


def decode(im: Image.Image, draft_side: int = DRAFT_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """Decode all of the image data (truncation and corruption fail here), upright and in RGB; return the image
    and the full image's size after EXIF orientation, what the report and the size check use.

    A JPEG is decoded at a reduced DCT scale (`draft_side`): libjpeg still reads and entropy-decodes every
    coefficient of every block and only skips part of the inverse DCT, so a truncated or corrupt file fails, or
    decodes, exactly as at full scale, with the same message (tests/data/test_validate_draft.py checks it on a corpus of
    600 damaged baseline and progressive JPEGs). Only the pixels are smaller; other formats decode at full size.
    """
    try:
        size = None
        if draft_side and im.format in ("JPEG", "MPO"):
            size = upright_size(im)  # from the header, before the draft shrinks im.size
            draft_for(im, (min(draft_side, size[0]), min(draft_side, size[1])))
        image = normalise(im)
        return image, size or image.size
    except Exception as exc:  # every decoder failure means the same thing: the file cannot be trained on
        raise Rejected("corrupt or truncated", f"corrupt or truncated image data ({_first_line(exc)})") from None


def check_size(size: tuple[int, int], config: ValidateConfig) -> None:
    width, height = size
    if min(width, height) < config.min_side:
        raise Rejected("too small", f"too small ({width}x{height}, shorter side below {config.min_side})")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise Rejected("extreme aspect ratio", f"extreme aspect ratio ({width}x{height}, more than "
                                               f"{config.max_aspect_ratio:g}:1)")


def find_duplicates(candidates: list[dict], max_distance: int) -> tuple[list[dict], list[dict]]:
    """Walk `candidates` in path order; return the records kept (without `phash`) and the duplicates' rejections.

    An exact duplicate has the sha256 of an accepted file; a near duplicate a perceptual hash within
    `max_distance` bits of one (re-encoded, rescaled, lightly cropped or retouched copies). Flat images have no
    perceptual hash and are only compared byte for byte.
    """
    accepted, rejected, by_sha = [], [], {}
    hashes, owners = np.zeros(len(candidates), dtype=np.uint64), []
    for record in sorted(candidates, key=lambda r: r["path"]):
        record = dict(record)
        phash = record.pop("phash")
        if record["sha256"] in by_sha:
            rejected.append({"path": record["path"], "check": "exact duplicate",
                             "reason": f"exact duplicate of {by_sha[record['sha256']]}"})
            continue
        if phash is not None and max_distance >= 0 and owners:
            distances = np.bitwise_count(hashes[:len(owners)] ^ np.uint64(phash))
            nearest = int(distances.argmin())
            if distances[nearest] <= max_distance:
                rejected.append({"path": record["path"], "check": "near duplicate",
                                 "reason": f"near duplicate of {owners[nearest]} (perceptual hash "
                                           f"{int(distances[nearest])} of 64 bits apart)"})
                continue
        by_sha[record["sha256"]] = record["path"]
        if phash is not None:
            hashes[len(owners)] = phash
            owners.append(record["path"])
        accepted.append(record)
    return accepted, rejected


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
