"""Hostile input made by a generator, wider than the cases named in any issue: a seeded generator writes files of
many classes (other formats behind image extensions, PostScript and PDF, archives and executables, image headers over
garbage, truncations at random points, huge sparse files, sidecars in every common encoding and in none), then the
preparation steps run on them through the CLI. For every generated folder: each step ends with exit 0 or 65 (never a
traceback), every hostile file is rejected with a reason or read right, the process stays within bounded memory,
and the folder's files hash the same before and after. Every output path that would overlap the input is refused.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MEASURED_STEP, REPO, SAMPLE
from sd_tasks import cli

pytestmark = pytest.mark.reliability

SEEDS = range(4)  # four folders, each with every class of hostile file
HEADERS = {  # what other kinds of file start with
    "postscript": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
    "zip": b"PK\x03\x04\x14\x00\x00\x00", "elf": b"\x7fELF\x02\x01\x01\x00", "mp4": b"\x00\x00\x00\x20ftypisom",
    "html": b"<!DOCTYPE html><script>", "svg": b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'>",
    "ico": b"\x00\x00\x01\x00\x01\x00\x10\x10", "psd": b"8BPS\x00\x01", "jpeg2000": b"\x00\x00\x00\x0cjP  \r\n\x87\n",
}
IMAGE_HEADERS = (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".tif", ".gif", ".JPG")
ENCODINGS = (("utf-8", b""), ("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
             ("utf-16-be", codecs.BOM_UTF16_BE), ("latin-1", b""), ("cp1252", b""))


def generate(folder: Path, seed: int) -> dict[str, str]:
    """Write the sample photos and hostile files of every class into `folder`; {file name: its class}."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    classes = {}
    for photo in sorted(SAMPLE.glob("*.jpg")):
        (folder / photo.name).write_bytes(photo.read_bytes())
        (folder / photo.with_suffix(".txt").name).write_bytes(sidecar(rng, classes, photo.stem))
    sample = (SAMPLE / "00.jpg").read_bytes()
    for kind, head in HEADERS.items():  # other formats behind an image's name
        name = f"{kind}-{seed}{rng.choice(EXTENSIONS)}"
        (folder / name).write_bytes(head + rng.randbytes(rng.randint(0, 4096)))
        classes[name] = "another format"
    for i, head in enumerate(IMAGE_HEADERS):  # an image's first bytes over garbage
        name = f"garbage-{i}{rng.choice(EXTENSIONS)}"
        (folder / name).write_bytes(head + rng.randbytes(rng.randint(0, 20000)))
        classes[name] = "image header over garbage"
    for i in range(2):  # a real photo cut at a random point
        name = f"cut-{i}.jpg"
        (folder / name).write_bytes(sample[: rng.randint(16, len(sample) - 1)])
        classes[name] = "cut photo"
    data = bytearray(sample)  # random bytes over a photo: a JPEG decoder may still read it (then it is accepted)
    for _ in range(50):
        data[rng.randrange(200, len(data))] = rng.randrange(256)
    (folder / "flipped.jpg").write_bytes(bytes(data))
    classes["flipped.jpg"] = "photo with random bytes"
    big = folder / f"video-{seed}.mov"  # a phone video of 3 GiB (sparse: no disk is used)
    with open(big, "wb") as f:
        f.write(HEADERS["mp4"])
        f.truncate(3 * 2**30)
    classes[big.name] = "huge non-image"
    (folder / f"empty-{seed}.png").write_bytes(b"")
    classes[f"empty-{seed}.png"] = "empty"
    return classes


def sidecar(rng: random.Random, classes: dict, stem: str) -> bytes:
    """A caption in a random common encoding, or random bytes that are no text."""
    if rng.random() < 0.2:
        classes[f"{stem}.txt"] = "binary sidecar"
        return b"\x00\x01" + rng.randbytes(64)
    encoding, bom = rng.choice(ENCODINGS)
    classes[f"{stem}.txt"] = f"sidecar in {encoding}{' with BOM' if bom else ''}"
    return bom + "on a sofa, café".encode(encoding)


def run(*argv: str) -> tuple[int, str, float]:
    """A step CLI in its own process: (exit code, stderr without the measurement, peak memory in MB)."""
    done = subprocess.run([sys.executable, "-c", MEASURED_STEP, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    lines = done.stderr.strip().splitlines()
    peak = int(lines.pop().split()[-1]) / 1024
    return done.returncode, "\n".join(lines), peak


def digest(folder: Path) -> str:
    """One hash of every file's path and content, each file streamed (the 3 GiB video too)."""
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            total.update(path.relative_to(folder).as_posix().encode() + hashlib.file_digest(f, "sha256").digest())
    return total.hexdigest()


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_hostile_folders_are_sorted_with_reasons_in_bounded_memory(seed, tmp_path, figures):
    photos = tmp_path / "photos"
    classes = generate(photos, seed)
    before = digest(photos)
    code, err, peak = run("validate", f"--input={photos}", f"--output={tmp_path / 'validated'}", "--workers=1")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    report = json.loads((tmp_path / "validated" / "report.json").read_text())
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    accepted = {r["path"] for r in report["accepted"]}
    hostile = [name for name, kind in classes.items() if not kind.startswith(("sidecar", "binary", "photo with"))]
    assert all(rejected.get(name) for name in hostile), {n: rejected.get(n) for n in hostile}
    assert accepted - {"flipped.jpg"} == {p.name for p in SAMPLE.glob("*.jpg")}
    assert peak < 1024, peak  # a 3 GiB video costs its first bytes
    code, err, _ = run("caption", f"--report={tmp_path / 'validated'}", f"--output={tmp_path / 'captions'}",
                       "--instance-prompt=a photo of sks dog", "--strategy=sidecar")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    manifest = json.loads((tmp_path / "captions" / "manifest.json").read_text())
    captions = {r["path"]: r["caption"] for r in manifest["records"]}
    for photo in accepted - {"flipped.jpg"}:
        kind = classes[Path(photo).with_suffix(".txt").name]
        expected = "a photo of sks dog" if kind == "binary sidecar" else "a photo of sks dog, on a sofa, café"
        assert captions[photo] == expected, (photo, kind, captions[photo], manifest["caption_notes"])
    for output in (photos, photos / "inside", tmp_path):  # the input itself, inside it, around it
        code, err, _ = run("validate", f"--input={photos}", f"--output={output}")
        assert code == cli.EXIT_REFUSED and len(err.splitlines()) == 1, err
    assert digest(photos) == before
    for kind in sorted(set(classes.values())):
        count = sum(1 for k in classes.values() if k == kind)
        figures.record("hostile", f"generated (seed {seed}): {kind}", f"{count} file(s), each rejected with a reason "
                       f"or read right; peak memory {peak:.0f} MB", lost=0)
    figures.record("hostile", f"generated (seed {seed}): output over the input", "3 overlapping outputs refused, "
                   "exit 65", lost=0)
