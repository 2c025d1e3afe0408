"""validate (and the image opening it shares with resize) on real files made in the test, all small."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from conftest import tree_snapshot
from sd_tasks import cli
from sd_tasks.core.errors import StepError
from sd_tasks.data import caption, resize, validate
from sd_tasks.data.images import NEUTRAL_GREY, open_rgb, perceptual_hash


def pattern(seed: int, size=(96, 80)) -> Image.Image:
    """A smooth random picture: distinct structure per seed, so perceptual hashes differ (flat colours have none)."""
    low = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.BICUBIC)


def photo(path, size=(96, 80), color=(200, 30, 30), mode="RGB", **save):
    Image.new(mode, size, color if mode == "RGB" else None).save(path, **save)
    return path


def png_header_only(path, width, height):
    """A few hundred bytes of PNG whose header claims width x height: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))


def exact_tree(folder) -> dict:
    """Everything about a folder that validate could change: entries, kinds, modes, mtimes, bytes, link targets."""
    tree = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            info = os.lstat(path)
            content = os.readlink(path) if os.path.islink(path) else \
                open(path, "rb").read() if os.path.isfile(path) else None
            tree[os.path.relpath(path, folder)] = (info.st_mode, info.st_size, info.st_mtime_ns, content)
    return tree


@pytest.fixture
def dataset(tmp_path):
    """One file per case of the issue: unusual files to accept, broken ones to reject."""
    folder = tmp_path / "dataset"
    (folder / "sub dir").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pillow_heif.register_heif_opener()

    # accepted, normalised
    pattern(1).save(folder / "good.jpg", quality=95)
    pattern(2).save(folder / "sub dir" / "ünïcode näme.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: portrait
    pattern(3, (120, 80)).save(folder / "rotated.jpg", exif=exif)
    pattern(4).convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.asarray(pattern(5).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    palette = pattern(6).quantize(16)
    palette.save(folder / "palette.png", transparency=0)
    rgba = pattern(7).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    pattern(8).convert("LA").save(folder / "grey-alpha.png")
    pattern(9).convert("L").save(folder / "grey.png")
    pattern(10).save(folder / "photo.webp", quality=90)
    pattern(11).save(folder / "scan.tif")
    pattern(12).save(folder / "phone.heic", format="HEIF", quality=90)
    pattern(13).save(folder / "phone.avif", format="AVIF", quality=90)
    pattern(14).save(folder / "lies.png", format="JPEG")
    frames = [pattern(15 + i) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped, neither accepted nor rejected

    # rejected
    (folder / "empty.jpg").write_bytes(b"")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    pattern(20).save(png, "PNG")
    png = bytearray(png.getvalue())
    png[60:200] = bytes(140)  # zeros over the compressed pixel data
    (folder / "corrupt.png").write_bytes(bytes(png))
    (folder / "header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    avif = (folder / "phone.avif").read_bytes()
    (folder / "cut.avif").write_bytes(avif[: len(avif) // 2])
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "video.mov").write_bytes(b"\0\0\0\x14ftypqt  \0\0\0\0qt  " + bytes(100))
    pattern(21, (40, 40)).save(folder / "tiny.png")
    pattern(22, (400, 64)).save(folder / "wide.png")
    png_header_only(folder / "bomb.png", 10_000, 10_000)  # 100 MP: above our 64 MP limit, below PIL's error
    png_header_only(folder / "huge bomb.png", 20_000, 20_000)  # 400 MP: PIL itself refuses to open it
    (folder / "good_again.jpg").write_bytes(data)
    pattern(1, (120, 100)).save(folder / "good_resaved.jpg", quality=40)  # re-encoded, rescaled: near duplicate
    os.symlink(folder / "good.jpg", folder / "link.jpg")
    pattern(23).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", folder / "sub dir" / "escape.jpg")
    os.symlink(outside, folder / "linked dir")
    os.mkfifo(folder / "pipe.jpg")
    return folder


ACCEPTED = {"good.jpg", "sub dir/ünïcode näme.jpg", "rotated.jpg", "cmyk.jpg", "deep.png", "palette.png",
            "alpha.png", "grey-alpha.png", "grey.png", "photo.webp", "scan.tif", "phone.heic", "phone.avif",
            "lies.png", "anim.gif"}
REJECTED = {
    "empty.jpg": "empty file",
    "truncated.jpg": "corrupt or truncated image data (image file is truncated",
    "corrupt.png": "corrupt or truncated image data (",
    "header.png": "corrupt or truncated image data (",
    "cut.avif": "corrupt or truncated image data (unreadable header)",
    "notes.jpg": "not an image",
    "video.mov": "not an image",
    "tiny.png": "too small (40x40, shorter side below 64)",
    "wide.png": "extreme aspect ratio (400x64, more than 4:1)",
    "bomb.png": "too many pixels (10000x10000 = 100,000,000 pixels, limit 64,000,000): possible decompression bomb",
    "huge bomb.png": "too many pixels (header claims more than 178,956,970 pixels, PIL's own hard limit)",
    "good_again.jpg": "exact duplicate of good.jpg",
    "good_resaved.jpg": "near duplicate of good.jpg (perceptual hash ",
    "link.jpg": "symbolic link (only regular files are read)",
    "sub dir/escape.jpg": "symbolic link (points outside the dataset folder)",
    "linked dir": "symbolic link to a folder (not followed)",
    "pipe.jpg": "not a regular file",
}


def test_every_case_gets_its_own_reason_and_the_input_is_untouched(dataset, tmp_path):
    before, before_bytes = exact_tree(dataset), tree_snapshot(dataset)
    result = validate.run(validate.ValidateConfig(input=str(dataset), output=str(tmp_path / "out")))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    accepted = {r["path"]: r for r in report["accepted"]}
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(accepted) == ACCEPTED
    assert set(rejected) == set(REJECTED)
    for path, reason in REJECTED.items():
        assert rejected[path].startswith(reason), (path, rejected[path])
    assert result == {"report": f"{tmp_path / 'out'}/report.json", "accepted": len(ACCEPTED),
                      "rejected": len(REJECTED)}
    assert exact_tree(dataset) == before and tree_snapshot(dataset) == before_bytes

    for record in accepted.values():
        assert {"path", "width", "height", "format", "sha256"} <= set(record) and len(record["sha256"]) == 64
    assert (accepted["rotated.jpg"]["width"], accepted["rotated.jpg"]["height"]) == (80, 120)  # after EXIF
    assert "EXIF orientation 6 applied" in accepted["rotated.jpg"]["notes"]
    assert {accepted[p]["format"] for p in ("phone.heic", "phone.avif", "photo.webp", "scan.tif", "lies.png")} == \
        {"HEIF", "AVIF", "WEBP", "TIFF", "JPEG"}
    assert "content is JPEG, extension .png says PNG" in accepted["lies.png"]["notes"]
    assert "animated (3 frames): frame 0 used" in accepted["anim.gif"]["notes"]
    assert "CMYK converted to RGB" in accepted["cmyk.jpg"]["notes"]
    assert "notes" not in accepted["good.jpg"]


def test_pool_and_single_process_agree(dataset, tmp_path):
    for workers in (1, 2):
        validate.run(validate.ValidateConfig(input=str(dataset), output=str(tmp_path / f"w{workers}"),
                                             workers=workers))
    assert (tmp_path / "w1" / "report.json").read_text() == (tmp_path / "w2" / "report.json").read_text()


def test_animation_can_be_rejected_and_pixel_limit_is_configurable(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [pattern(i) for i in range(2)]
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    pattern(3, (120, 100)).save(folder / "big.jpg")  # 12,000 pixels
    pattern(4, (90, 80)).save(folder / "ok.jpg")  # 7,200 pixels
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "out"), animated="reject",
                                         max_pixels=10_000, workers=1))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["path"] for r in report["accepted"]] == ["ok.jpg"]
    assert {r["path"]: r["reason"] for r in report["rejected"]} == {
        "anim.webp": "animated (2 frames), a still image is needed",
        "big.jpg": "too many pixels (120x100 = 12,000 pixels, limit 10,000): possible decompression bomb"}
    with pytest.raises(StepError, match="--animated 'maybe': choose one of first-frame, reject"):
        validate.ValidateConfig(input="a", output="b", animated="maybe")


def test_near_duplicate_check_can_be_turned_off(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    pattern(1).save(folder / "a.jpg", quality=95)
    pattern(1, (120, 100)).save(folder / "b.jpg", quality=40)
    on = validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "on"), workers=1))
    off = validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "off"), workers=1,
                                               near_duplicate_distance=-1))
    assert (on["accepted"], off["accepted"]) == (1, 2)


def test_too_few_images_exits_non_zero_with_one_summary_line(dataset, tmp_path, capsys):
    argv = ["validate", "--input", str(dataset), "--output", str(tmp_path / "out")]
    assert cli.main(argv + ["--min-images", "20"]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: validate: {dataset}: 15 usable images, need 20 (")
    for summary in ("1 empty file", "3 symbolic link", "1 not a regular file", "2 too many pixels", "2 not an image",
                    "1 exact duplicate", "1 near duplicate", "4 corrupt or truncated", "1 too small",
                    "1 extreme aspect ratio"):
        assert summary in err
    assert not (tmp_path / "out").exists()
    assert cli.main(argv + ["--min-images", "15"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accepted"] == 15


def test_unusual_modes_become_sane_rgb(tmp_path):
    grey = NEUTRAL_GREY
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (255, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    im = open_rgb(tmp_path / "rgba.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == grey and im.getpixel((1, 1)) == (255, 0, 0)
    assert im.getpixel((2, 2)) == (191, 63, 63)  # half red over grey

    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").getpixel((0, 0)) == grey

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    im = open_rgb(tmp_path / "palette.png")
    assert im.getpixel((0, 0)) == grey and im.getpixel((1, 1)) == (0, 255, 0)

    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert [open_rgb(tmp_path / "deep.png").getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (127, 127, 127),
                                                                                    (255, 255, 255)]

    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (0, 0, 8, 16))  # left half red, right half white
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    cmyk.save(tmp_path / "cmyk.tif")
    for name in ("cmyk.jpg", "cmyk.tif"):
        im = open_rgb(tmp_path / name)
        assert np.abs(np.subtract(im.getpixel((2, 8)), (255, 0, 0))).max() <= 8, name
        assert np.abs(np.subtract(im.getpixel((13, 8)), (255, 255, 255))).max() <= 8, name

    Image.new("L", (4, 4), 90).save(tmp_path / "grey.png")
    assert open_rgb(tmp_path / "grey.png").getpixel((0, 0)) == (90, 90, 90)

    marked = Image.new("RGB", (60, 40), (0, 0, 255))
    marked.paste((255, 0, 0), (0, 0, 10, 10))  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    marked.save(tmp_path / "rotated.png", exif=exif)
    im = open_rgb(tmp_path / "rotated.png")
    assert im.size == (40, 60) and im.getpixel((35, 4)) == (255, 0, 0)  # shown: red top-right

    pillow_heif.register_heif_opener()
    for fmt in ("HEIF", "AVIF"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / f"x.{fmt}", format=fmt, quality=90)
        assert np.abs(np.subtract(open_rgb(tmp_path / f"x.{fmt}").getpixel((30, 30)), (200, 30, 30))).max() <= 6


def display_p3_profile() -> bytes:
    """A Display P3 ICC profile, built offline: lcms's sRGB profile (same transfer curve and white point as P3) with
    its colourants swapped for P3's (D50-adapted, as in Apple's profile) and its name changed."""
    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    p3 = {b"rXYZ": (0.5151, 0.2412, -0.0011), b"gXYZ": (0.2920, 0.6922, 0.0419), b"bXYZ": (0.1571, 0.0666, 0.7841)}
    for i in range(struct.unpack(">I", icc[128:132])[0]):
        signature, offset, _ = struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i])
        if signature in p3:  # an XYZType: 'XYZ ', 4 reserved bytes, three s15Fixed16 numbers
            icc[offset + 8:offset + 20] = struct.pack(">3i", *(round(v * 65536) for v in p3[signature]))
    return bytes(icc).replace("sRGB".encode("utf-16-be"), "P3  ".encode("utf-16-be"))


def test_colour_profiles_other_than_srgb_are_converted(tmp_path):
    from PIL import ImageCms

    p3 = display_p3_profile()
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(p3))).startswith("P3")
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (96, 80), (200, 100, 50)).save(folder / "p3.jpg", quality=95, icc_profile=p3)
    Image.new("RGBA", (96, 80), (200, 100, 50, 255)).save(folder / "p3-alpha.png", icc_profile=p3)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pattern(1).save(folder / "srgb.png", icc_profile=srgb)
    before = tree_snapshot(folder)

    # P3's orange, in sRGB numbers: more red, less green and blue (its primaries lie further out)
    for name in ("p3.jpg", "p3-alpha.png"):
        r, g, b = open_rgb(folder / name).getpixel((40, 40))
        assert r > 210 and g < 95 and b < 40, (name, (r, g, b))
    tagged_srgb = open_rgb(folder / "srgb.png")
    assert np.array_equal(np.asarray(tagged_srgb), np.asarray(pattern(1)))  # sRGB stays as it is

    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "validated"), min_images=1))
    report = json.loads((tmp_path / "validated" / "report.json").read_text())
    notes = {r["path"]: r.get("notes", []) for r in report["accepted"]}
    assert "colour profile 'P3   built-in' converted to sRGB" in notes["p3.jpg"] and notes["srgb.png"] == []
    caption.run(caption.CaptionConfig(report=str(tmp_path / "validated"), output=str(tmp_path / "captions"),
                                      instance_prompt="a photo of sks thing"))
    resize.run(resize.ResizeConfig(captions=str(tmp_path / "captions"), output=str(tmp_path / "resized"),
                                   resolution=64))
    records = json.loads((tmp_path / "resized" / "manifest.json").read_text())["records"]
    written = [tmp_path / "resized" / r["file"] for r in records if r["source"].startswith("p3")]
    assert len(written) == 2
    for path in written:  # sRGB pixels, and no P3 tag left for viewers to apply a second time
        with Image.open(path) as im:
            assert "icc_profile" not in im.info and im.getpixel((10, 10))[0] > 210, path.name
    assert tree_snapshot(folder) == before


def test_perceptual_hash_sees_copies_not_different_pictures():
    def distance(a, b):
        return bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1")
    base = pattern(1, (200, 160))
    jpeg = io.BytesIO()
    base.save(jpeg, "JPEG", quality=30)
    assert distance(base, Image.open(jpeg)) <= 4
    assert distance(base, base.resize((150, 120))) <= 4
    assert min(distance(base, pattern(seed, (200, 160))) for seed in range(2, 12)) > 8
    assert perceptual_hash(Image.new("RGB", (50, 50), (10, 200, 30))) is None  # flat: nothing to compare


def test_resize_draft_decoding_keeps_sizes_and_crops(tmp_path):
    """resize decodes JPEGs at reduced DCT scale; sizes and crops must equal a full-scale decode's."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    pattern(1, (1001, 667)).save(folder / "odd.jpg")
    pattern(2, (900, 1203)).save(folder / "tall.jpg")
    pattern(3, (1200, 800)).save(folder / "rotated.jpg", exif=exif)
    pattern(4, (700, 700)).save(folder / "square.png")
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v"), workers=1))
    caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"), instance_prompt="x"))
    resize.run(resize.ResizeConfig(captions=str(tmp_path / "c"), output=str(tmp_path / "r"), resolution=192,
                                   bucket_step=32))
    buckets = resize.aspect_buckets(192, 32, 2.0)
    for record in json.loads((tmp_path / "r" / "manifest.json").read_text())["records"]:
        full = open_rgb(folder / record["source"])  # no draft: the reference
        width, height = resize.nearest_bucket(full.size, buckets)
        expected, crop = resize.cover_and_crop(full, width, height)
        out = Image.open(tmp_path / "r" / record["file"])
        assert record["original_size"] == [full.height, full.width] and record["target_size"] == [height, width]
        assert record["crop_top_left"] == crop and out.size == expected.size == (width, height)
        assert np.abs(np.asarray(out, dtype=int) - np.asarray(expected, dtype=int)).mean() < 3, record["source"]


# Moved from test_prepare.py: the original messy folder of flat-colour files.

@pytest.fixture
def messy(tmp_path):
    folder = tmp_path / "messy"
    folder.mkdir()
    photo(folder / "good.jpg")
    photo(folder / "later copy.jpg")  # byte-identical to good.jpg
    photo(folder / "wide.png", size=(400, 64), color=(0, 0, 255))
    photo(folder / "tiny.png", size=(32, 32), color=(0, 255, 0))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    rgba = Image.new("RGBA", (90, 90), (255, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    photo(folder / "grey.png", size=(100, 70), color=None, mode="L")
    os.symlink(folder / "good.jpg", folder / "link.jpg")
    photo(folder / "lying extension ü.png", size=(70, 90), color=(9, 9, 9), format="JPEG")
    return folder


def test_validate_accepts_unusual_rejects_broken_and_leaves_input_untouched(messy, tmp_path):
    before = tree_snapshot(messy)
    result = validate.run(validate.ValidateConfig(input=str(messy), output=str(tmp_path / "out"), min_side=64))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    accepted = {r["path"] for r in report["accepted"]}
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    assert accepted == {"alpha.png", "good.jpg", "grey.png", "lying extension ü.png"}
    assert rejected["later copy.jpg"] == "exact duplicate of good.jpg"
    assert rejected["empty.jpg"] == "empty file"
    assert rejected["notes.jpg"] == "not an image"
    assert rejected["truncated.jpg"].startswith("corrupt or truncated")
    assert rejected["tiny.png"].startswith("too small")
    assert rejected["wide.png"].startswith("extreme aspect ratio")
    assert rejected["link.jpg"].startswith("symbolic link")
    assert result == {"report": f"{tmp_path / 'out'}/report.json", "accepted": 4, "rejected": 7}
    assert next(r for r in report["accepted"] if r["path"] == "lying extension ü.png")["format"] == "JPEG"
    assert tree_snapshot(messy) == before


def test_validate_fails_with_a_summary_when_too_few_images(messy, tmp_path):
    with pytest.raises(StepError, match=r"4 usable images, need 10 \(.*1 empty file.*\)"):
        validate.run(validate.ValidateConfig(input=str(messy), output=str(tmp_path / "out"), min_images=10))
    assert not (tmp_path / "out").exists()


def test_a_huge_non_image_costs_its_first_bytes_and_only_accepted_decoders_run(tmp_path, monkeypatch):
    """A phone video of 4 GiB (sparse here) in the photo folder: rejected as not an image after its first 16 bytes,
    in constant memory (a subprocess, its peak memory measured); an image larger than --max-file-mb: rejected by its
    size before it is read. A PostScript file named .jpg never reaches Pillow's EPS plugin (which runs Ghostscript):
    only the accepted formats' decoders are used, whatever a file's content says."""
    import subprocess
    import sys

    from PIL import EpsImagePlugin

    from conftest import MEASURED_STEP, REPO

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        pattern(30 + i, (200, 160)).save(folder / f"good{i}.jpg", quality=95)
    with open(folder / "video.mp4", "wb") as f:
        f.write(b"\0\0\0\x20ftypisom\0\0\x02\0")
        f.truncate(4 * 2**30)
    (folder / "scan.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)).save(big, "PNG")
    (folder / "big.png").write_bytes(big.getvalue())  # about 4 MB of noise
    done = subprocess.run([sys.executable, "-c", MEASURED_STEP, "validate", f"--input={folder}",
                           f"--output={tmp_path / 'out'}", "--max-file-mb=2", "--workers=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stderr.split("peak-kb ")[-1]) / 1024
    assert peak_mb < 1024, done.stderr  # far below the 4 GiB a whole read would take
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    assert rejected["video.mp4"] == "not an image" and rejected["scan.jpg"] == "not an image"
    assert rejected["big.png"].startswith("4 MB, larger than --max-file-mb 2")
    # in-process too: the EPS plugin is never asked, even for content that starts like an accepted format
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS decoder ran"))
    from sd_tasks.data.images import open_image

    with pytest.raises(Exception):
        open_image(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    assert validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "again"), workers=1,
                                                max_file_mb=2))["rejected"] == 3
