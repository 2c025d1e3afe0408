"""dataset, caption and resize on real files made in the test (validate has tests/data/test_validate.py)."""
from __future__ import annotations

import codecs
import os
import json

import pytest
from PIL import Image

from conftest import SAMPLE, tree_snapshot
from sd_tasks.core.errors import StepError
from sd_tasks.data import caption, dataset, resize, validate


def photo(path, size=(96, 80), color=(200, 30, 30), mode="RGB", **save):
    Image.new(mode, size, color if mode == "RGB" else None).save(path, **save)
    return path


def captioned(tmp_path, **photos) -> str:
    """Photos (name -> photo() options) made, validated and captioned with the instance prompt; caption's output."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, options in photos.items():
        photo(folder / name, **options)
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v")))
    caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"), instance_prompt="x"))
    return str(tmp_path / "c")


def test_caption_instance_and_sidecar(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(folder / "a.jpg")
    photo(folder / "b.jpg", color=(1, 2, 3))
    (folder / "a.txt").write_text("  on a sofa\n")
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v")))
    result = caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"),
                                               instance_prompt="a photo of sks dog", strategy="sidecar"))
    records = json.loads((tmp_path / "c" / "manifest.json").read_text())["records"]
    assert {r["path"]: r["caption"] for r in records} == {"a.jpg": "a photo of sks dog, on a sofa",
                                                          "b.jpg": "a photo of sks dog"}
    assert result["missing_captions"] == ["b.jpg"]


def test_resize_buckets_and_micro_conditioning(tmp_path):
    captions = captioned(tmp_path, **{"landscape.jpg": dict(size=(300, 200)),
                                      "square.jpg": dict(size=(150, 150), color=(5, 5, 5))})
    resize.run(resize.ResizeConfig(captions=captions, output=str(tmp_path / "r"), resolution=128,
                                   bucket_step=32))
    records = {r["source"]: r for r in json.loads((tmp_path / "r" / "manifest.json").read_text())["records"]}
    land = records["landscape.jpg"]
    assert land["original_size"] == [200, 300]
    assert land["target_size"] == [96, 160]  # 160x96 (5:3) is the bucket nearest 3:2 within ~128² pixels
    assert land["crop_top_left"] == [5, 0]  # scaled to 160x107, center-cropped vertically
    assert Image.open(tmp_path / "r" / land["file"]).size == (160, 96)
    assert records["square.jpg"]["target_size"] == [128, 128]


def test_aspect_buckets_have_about_the_same_area():
    for width, height in resize.aspect_buckets(1024, 64, 2.0):
        assert width % 64 == 0 and height % 64 == 0
        assert 0.8 < width * height / 1024**2 <= 1.0
        assert max(width, height) / min(width, height) <= 2.0


def test_dataset_resolves_a_version_with_commit_and_content_hash(registry, tmp_path):
    result = dataset.run(dataset.DatasetConfig(repo=str(registry), path="dog", rev="dog-v1",
                                               output=str(tmp_path / "ds")))
    assert result["num_files"] == 5 and len(result["commit"]) == 40
    assert result["hash"] == dataset.content_hash(SAMPLE)
    assert tree_snapshot(tmp_path / "ds" / "images") == tree_snapshot(SAMPLE)
    written = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert written["files"] == sorted(p.name for p in SAMPLE.iterdir())


def test_dataset_names_the_bad_rev_and_path(registry, tmp_path):
    with pytest.raises(StepError, match="unknown Git revision 'v404'"):
        dataset.run(dataset.DatasetConfig(repo=str(registry), path="dog", rev="v404", output=str(tmp_path / "x")))
    with pytest.raises(StepError, match="no 'cat' at rev 'dog-v1'"):
        dataset.run(dataset.DatasetConfig(repo=str(registry), path="cat", rev="dog-v1", output=str(tmp_path / "x")))


def test_publish_refuses_to_move_an_existing_version(registry):
    with pytest.raises(StepError, match="tag 'dog-v1' already exists"):
        dataset.publish(dataset.PublishConfig(source=str(SAMPLE), repo=str(registry), path="dog", tag="dog-v1"))


def test_caption_with_a_captioning_model(tmp_path, home):
    from sd_tasks.models.tiny_model import CAPTION_WORDS, save_blip

    blip = tmp_path / "blip"
    blip.mkdir()
    save_blip(blip)
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(folder / "a.jpg")
    photo(folder / "b.jpg", color=(1, 2, 3))
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v")))
    caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"), strategy="model",
                                      instance_prompt="a photo of sks dog", caption_model=str(blip)))
    records = json.loads((tmp_path / "c" / "manifest.json").read_text())["records"]
    assert any(r["caption"] != "a photo of sks dog" for r in records)  # the model's words were used
    for r in records:  # the tiny model's words are random, but they come from its vocabulary, after the prompt
        assert r["caption"].startswith("a photo of sks dog")
        assert set(r["caption"].removeprefix("a photo of sks dog").strip(", ").split()) <= set(CAPTION_WORDS.split())


def test_resize_without_upscaling_and_with_random_crops(tmp_path):
    captions = captioned(tmp_path, **{"small.jpg": dict(size=(150, 100)),
                                      "big.jpg": dict(size=(900, 300), color=(9, 9, 9))})

    def records(**options):
        resize.run(resize.ResizeConfig(captions=captions, output=str(tmp_path / "r"), resolution=256,
                                       bucket_step=32, **options))
        return {r["source"]: r for r in json.loads((tmp_path / "r" / "manifest.json").read_text())["records"]}

    small = records(no_upscale=True)["small.jpg"]
    height, width = small["target_size"]
    assert width <= 150 and height <= 100  # a smaller bucket, not an enlarged photo
    assert records()["small.jpg"]["target_size"][0] > 100  # without the option it is enlarged
    crops = [records(crop="random", seed=seed)["big.jpg"]["crop_top_left"] for seed in range(4)]
    assert len({tuple(c) for c in crops}) > 1  # the crop moves with the seed...
    assert records(crop="random", seed=1)["big.jpg"]["crop_top_left"] == crops[1]  # ...and is stable for one seed
    big = records()["big.jpg"]
    assert big["crop_top_left"][1] == (big["scaled_size"][1] - big["target_size"][1]) // 2


@pytest.mark.parametrize("raw, expected, note", [
    ("on a sofa, café".encode("utf-8"), "on a sofa, café", None),
    (codecs.BOM_UTF8 + "on a sofa, café".encode("utf-8"), "on a sofa, café", None),  # Windows Notepad's UTF-8
    (codecs.BOM_UTF16_LE + "on a sofa, café".encode("utf-16-le"), "on a sofa, café", None),
    (codecs.BOM_UTF16_BE + "on a sofa, café".encode("utf-16-be"), "on a sofa, café", None),
    (codecs.BOM_UTF32_LE + "on a sofa, café".encode("utf-32-le"), "on a sofa, café", None),
    ("on a sofa".encode("utf-16-le"), "on a sofa", "no byte-order mark; read as UTF-16-LE"),
    ("on a sofa, café".encode("latin-1"), "on a sofa, café", "not UTF-8; read as Latin-1"),
    ("sofa, naïve".encode("cp1252"), "sofa, naïve", "not UTF-8; read as Latin-1"),
])
def test_sidecars_in_any_common_encoding_read_right_and_say_so(tmp_path, raw, expected, note):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(folder / "a.jpg")
    (folder / "a.txt").write_bytes(raw)
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v")))
    result = caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"),
                                               instance_prompt="a photo of sks dog", strategy="sidecar"))
    [record] = json.loads((tmp_path / "c" / "manifest.json").read_text())["records"]
    assert record["caption"] == f"a photo of sks dog, {expected}"
    assert result["caption_notes"] == ([f"a.txt: {note}"] if note else [])


def test_a_sidecar_that_is_not_text_is_refused_with_its_reason(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(folder / "a.jpg")
    (folder / "a.txt").write_bytes(b"\x00\x01\x02binary\x00\xff")
    validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v")))
    result = caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"),
                                               instance_prompt="a photo of sks dog", strategy="sidecar"))
    assert result["refused_captions"] == ["a.txt: not text (NUL bytes, and neither UTF-8 nor UTF-16); not read"]


@pytest.mark.parametrize("rev", ["dog-v1", "no-such-tag"])
def test_a_cloned_registry_leaves_nothing_behind(registry, tmp_path, rev):
    """A registry given by URL is cloned (its .git/config holds the URL, with any token in it): the clone and DVC's
    temporary files live in the step's scratch folder and are gone after the step, whether it succeeded or not."""
    import subprocess
    import sys

    from conftest import REPO

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "sd_tasks", "dataset", f"--repo=file://{registry}", "--path=dog",
                           f"--rev={rev}", f"--output={tmp_path / 'dataset'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == (0 if rev == "dog-v1" else 65), done.stderr
    assert sorted(p.name for p in scratch.iterdir()) == [], list(scratch.rglob("*"))[:5]


def test_a_registry_that_cannot_be_cloned_says_why_in_one_line(tmp_path):
    """scmrepo says "CloneError: SCM error"; the reason is in its causes: shown, the token masked, and a host that
    refuses the connection is exit 1 (a retry can help), a repository that is not there 65."""
    import subprocess
    import sys

    from conftest import REPO

    def fetch(repo: str):
        return subprocess.run([sys.executable, "-m", "sd_tasks", "dataset", f"--repo={repo}", "--path=dog",
                               "--rev=main", f"--output={tmp_path / 'dataset'}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    down = fetch("https://someone:s3cret-token@127.0.0.1:1/registry.git")
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "Connection refused" in down.stderr and "s3cret-token" not in down.stderr and "***" in down.stderr
    missing = fetch(f"file://{tmp_path / 'no-such-registry'}")
    assert missing.returncode == 65 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "SCM error;" in missing.stderr or "no-such-registry" in missing.stderr


def test_files_that_cannot_be_read_are_named_with_the_reason_not_a_traceback(tmp_path, monkeypatch):
    """An unreadable photo or sidecar (no permission: root, which CI runs as, reads anything, so the denial is
    simulated at os.open / open) is rejected or refused with its reason, and the step goes on."""
    import builtins

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, color in (("a.jpg", (10, 20, 30)), ("b.jpg", (200, 100, 0)), ("locked.jpg", (0, 90, 200))):
        photo(folder / name, color=color)
    (folder / "a.txt").write_text("on a sofa")
    real_open, real_builtin_open = os.open, builtins.open

    def denied(path, *args, **kwargs):
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def denied_text(path, *args, **kwargs):
        if str(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_builtin_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    report = validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "v"), workers=1))
    assert report["accepted"] == 2
    rejected = json.loads((tmp_path / "v" / "report.json").read_text())["rejected"]
    assert {"path": "locked.jpg", "reason": "cannot be read (Permission denied)"} in rejected
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(builtins, "open", denied_text)
    result = caption.run(caption.CaptionConfig(report=str(tmp_path / "v"), output=str(tmp_path / "c"),
                                               instance_prompt="a photo of sks dog", strategy="sidecar"))
    assert result["refused_captions"] == ["a.txt: cannot be read (Permission denied); not read"]


@pytest.mark.parametrize("url, bare, credentials", [
    ("https://ci:t%40ken@git.example.com/ml/registry.git", "https://git.example.com/ml/registry.git", "ci:t@ken"),
    ("http://TOKEN@127.0.0.1:8080/r.git", "http://127.0.0.1:8080/r.git", "TOKEN:"),
    ("https://git.example.com/r.git", "https://git.example.com/r.git", None),
    ("ssh://git@git.example.com/r.git", "ssh://git@git.example.com/r.git", None),  # ssh's user is no secret
    ("/srv/registry", "/srv/registry", None)])
def test_credentials_leave_the_url_for_a_request_header(url, bare, credentials, monkeypatch):
    """The URL a clone records is the bare one; the credentials become a Basic header sent only to that URL, after
    the ones the deployment's Secret sets (GIT_CONFIG_COUNT counts on)."""
    import base64

    from sd_tasks.data.dataset import git_header, split_credentials

    got, header = split_credentials(url)
    assert got == bare
    if credentials is None:
        assert header is None and git_header(got, header) == {}
        return
    assert header == "Authorization: Basic " + base64.b64encode(credentials.encode()).decode()
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    assert git_header(got, header) == {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_1": f"http.{bare}.extraHeader",
                                       "GIT_CONFIG_VALUE_1": header}
