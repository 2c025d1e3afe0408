"""validate decodes JPEGs at a reduced DCT scale: a corpus of damaged JPEGs, made here, proves that this detects
truncation and corruption exactly as a full-scale decode does (same verdict, same reason, for every file)."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sd_tasks.data import validate

SIZE = (136, 104)  # not a multiple of the 16-pixel MCU: partial blocks at the right and bottom edges
TURNED = Image.Exif()
TURNED[0x0112] = 6  # EXIF orientation: stored landscape, shown portrait

# (name, mode, save options): baseline and progressive, 4:4:4, 4:2:2 and 4:2:0 subsampling, grey, CMYK, restart
# markers, an EXIF orientation that swaps width and height
VARIANTS = [(f"{kind}-{sub}", "RGB", {"progressive": kind == "progressive", "subsampling": sub})
            for kind in ("baseline", "progressive") for sub in ("4:4:4", "4:2:2", "4:2:0")] + [
    ("grey", "L", {}),
    ("grey-progressive", "L", {"progressive": True}),
    ("cmyk", "CMYK", {}),
    ("restarts", "RGB", {"restart_marker_blocks": 5}),
    ("rotated", "RGB", {"progressive": True, "exif": TURNED}),
]


def picture(seed: int, mode: str) -> Image.Image:
    """A smooth random picture with noise on top, so the entropy-coded data is neither tiny nor regular."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(SIZE, Image.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).convert(mode)


def damaged(data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Damaged copies of one JPEG: truncated at many offsets (header, scans, just before and inside the EOI marker),
    bytes flipped in the entropy-coded data and in the header segments (tables, frame header), runs of garbage."""
    scan = data.index(b"\xff\xda")
    out = {f"cut-{n}": data[:n] for n in range(2, len(data) - 3, max(1, len(data) // 24))}
    out |= {f"cut-{n}": data[:n] for n in (scan + 4, scan + 20, len(data) - 3, len(data) - 2, len(data) - 1)}
    for _ in range(14):
        at = int(rng.integers(scan + 14, len(data) - 2))
        out[f"flip-{at}"] = data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:]
    for _ in range(8):
        at = int(rng.integers(2, scan))
        out[f"header-{at}"] = data[:at] + bytes([data[at] ^ int(rng.integers(1, 256))]) + data[at + 1:]
    for _ in range(3):
        at = int(rng.integers(scan + 14, len(data) - 40))
        out[f"garbage-{at}"] = data[:at] + rng.integers(0, 256, 24, dtype=np.uint8).tobytes() + data[at + 24:]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every damaged file of every variant in one folder, plus the undamaged originals."""
    folder = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(12)
    for seed, (name, mode, options) in enumerate(VARIANTS):
        buffer = io.BytesIO()
        picture(seed, mode).save(buffer, "JPEG", quality=88, **options)
        data = buffer.getvalue()
        (folder / f"{name}.jpg").write_bytes(data)
        for damage, broken in damaged(data, rng).items():
            (folder / f"{name}.{damage}.jpg").write_bytes(broken)
    return folder


def full_decode_fails(data: bytes) -> bool:
    """The reference, without validate: plain PIL, every byte at full scale."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:
        return True
    return False


def test_reduced_scale_gives_a_full_decodes_verdict_on_every_damaged_jpeg(corpus):
    config = validate.ValidateConfig(input=str(corpus), output="unused", min_side=8)
    verdicts, outcomes = Counter(), Counter()
    paths = sorted(corpus.iterdir())
    for side, scaled in ((52, (68, 52)), (26, (34, 26)), (8, (17, 13))):  # the drafts really are 1/2, 1/4, 1/8
        with Image.open(corpus / "progressive-4:2:0.jpg") as im:
            image, size = validate.decode(im, side)
        assert (image.size, size) == (scaled, SIZE)
    for path in paths:
        full = validate.check_file(path, corpus, config, draft_side=0)
        full.pop("phash", None)
        for side in (52, 26, 8):  # 1/2, 1/4 and 1/8 of 136x104
            reduced = validate.check_file(path, corpus, config, draft_side=side)
            reduced.pop("phash", None)
            assert reduced == full, (path.name, side)
        unreadable = full.get("check") in ("corrupt or truncated", "not an image")
        assert unreadable == full_decode_fails(path.read_bytes()), (path.name, full)
        verdicts[full.get("check", "accepted")] += 1
        damage = path.suffixes[0][1:].split("-")[0] if len(path.suffixes) > 1 else "original"
        outcomes[damage, "reason" not in full] += 1
    # the corpus can fail the test: it holds damaged files that are rejected and damaged files that decode
    assert len(paths) > 500 and verdicts["corrupt or truncated"] > 300 and verdicts["accepted"] > 100, verdicts
    assert outcomes[("cut", False)] > 250 and outcomes[("flip", True)] > 20 and outcomes[("flip", False)] > 0
    assert outcomes[("header", True)] > 0 and outcomes[("header", False)] > 0 and outcomes[("garbage", True)] > 0
    assert outcomes[("original", True)] == len(VARIANTS), outcomes
    reasons = {validate.check_file(p, corpus, config).get("reason", "")[:60] for p in paths}
    assert any("image file is truncated" in r for r in reasons) and any("broken data stream" in r for r in reasons)


def test_cut_just_before_or_inside_the_end_marker_is_rejected(corpus):
    config = validate.ValidateConfig(input=str(corpus), output="unused", min_side=8)
    for name, _, _ in VARIANTS:
        size = (corpus / f"{name}.jpg").stat().st_size
        for cut in (size - 2, size - 1):
            result = validate.check_file(corpus / f"{name}.cut-{cut}.jpg", corpus, config)
            assert result["reason"].startswith("corrupt or truncated image data (image file is truncated"), result


def test_a_reduced_decode_reports_the_full_images_size(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    picture(1, "RGB").resize((1200, 800)).save(folder / "rotated.jpg", exif=TURNED, quality=90)
    picture(2, "RGB").resize((2100, 1100)).save(folder / "wide.jpg", quality=90, progressive=True)
    picture(3, "RGB").resize((700, 500)).save(folder / "small.png")
    picture(4, "RGB").resize((1200, 900)).save(folder / "phone.mpo", "MPO", save_all=True,  # photo + preview
                                               append_images=[picture(5, "RGB")])

    with Image.open(folder / "rotated.jpg") as im:  # the draft really happens: 1/2 scale, both sides >= 256
        image, size = validate.decode(im)
    assert (image.size, size) == ((400, 600), (800, 1200))
    with Image.open(folder / "wide.jpg") as im:
        image, size = validate.decode(im)
    assert (image.size, size) == ((525, 275), (2100, 1100))  # 1/4

    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "out"), workers=1))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sizes = {r["path"]: (r["width"], r["height"]) for r in report["accepted"]}
    assert sizes == {"rotated.jpg": (800, 1200), "wide.jpg": (2100, 1100), "small.png": (700, 500),
                     "phone.mpo": (1200, 900)}
    assert next(r for r in report["accepted"] if r["path"] == "rotated.jpg")["notes"] == ["EXIF orientation 6 applied"]
    for record in report["accepted"]:  # the report is a full decode's, record for record (phash is not in it)
        full = validate.check_file(folder / record["path"], folder, validate.ValidateConfig(
            input=str(folder), output="unused"), draft_side=0)
        full.pop("phash")
        assert full == record
