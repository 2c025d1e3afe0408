"""Screening (sd_tasks.safety.screening): the real NudeNet detector on harmless photos, loading a screen of one's
own in one line or not at all, and `validate` quarantining or refusing what a screen flags (a stand-in screen that
only the tests inject flags red pictures: no explicit material in the repository)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tree_snapshot
from sd_tasks.core.errors import StepError
from sd_tasks.data import validate
from sd_tasks.safety.screening import NudeNetScreen, load_screen
from stand_in_screen import spec

PHOTOS = sorted((REPO / "sample_data").glob("*/*.jpg"))


def test_the_real_detector_flags_none_of_the_sample_photos():
    screen = load_screen("nudenet")
    assert isinstance(screen, NudeNetScreen)
    assert len(PHOTOS) >= 10
    assert [screen.reason(Image.open(path)) for path in PHOTOS] == [None] * len(PHOTOS)


def test_only_exposed_classes_at_the_threshold_or_above_flag_and_the_strongest_is_named(monkeypatch):
    """The screen's reading of the detector's findings (the detector itself stands in here: its findings are given)."""
    screen = NudeNetScreen(threshold=0.5)
    findings = [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 9, 9]},  # not a class that flags
                {"class": "BUTTOCKS_EXPOSED", "score": 0.49, "box": [0, 0, 9, 9]},  # below the threshold
                {"class": "FEMALE_BREAST_EXPOSED", "score": 0.61, "box": [0, 0, 9, 9]},
                {"class": "MALE_GENITALIA_EXPOSED", "score": 0.83, "box": [0, 0, 9, 9]}]
    given = []
    monkeypatch.setattr(screen.detector, "detect", lambda bgr: given.append(bgr.shape) or findings)
    assert screen.reason(Image.new("RGB", (32, 24))) == "nudenet: MALE_GENITALIA_EXPOSED 0.83"
    assert given == [(24, 32, 3)]  # the whole image, as an array
    findings[2:] = []
    assert screen.reason(Image.new("RGB", (32, 24))) is None


@pytest.mark.parametrize("bad", ["nudenett", "no/such/file.py:Screen", "json:NoSuchName", "no_such_module:X"])
def test_a_screen_that_cannot_be_loaded_is_one_line_naming_the_setting(bad):
    with pytest.raises(StepError, match=r"^--screen .*") as refused:
        load_screen(bad)
    assert "\n" not in str(refused.value)


def pictures(folder, red: int = 1, plain: int = 3):
    folder.mkdir()
    for i in range(plain):
        low = np.random.default_rng(i).integers(0, 120, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((96, 96), Image.BICUBIC).save(folder / f"plain-{i}.png")
    for i in range(red):
        Image.new("RGB", (96, 96), (220 - 20 * i, 10, 20)).save(folder / f"red-{i}.png")
    return folder


def test_validate_quarantines_a_flagged_photo_with_the_screens_reason(tmp_path):
    folder = pictures(tmp_path / "photos")
    before = tree_snapshot(folder)
    result = validate.run(validate.ValidateConfig(input=str(folder), output=str(tmp_path / "out"),
                                                  screen=spec("FlagRed")))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (result["accepted"], result["rejected"]) == (3, 1)
    assert report["rejected"] == [{"path": "red-0.png", "reason": "flagged by the screen (stand-in: red): "
                                                                  "quarantined, not trained on"}]
    assert tree_snapshot(folder) == before  # quarantined means left out, never moved or deleted


def test_validate_with_the_refuse_policy_fails_in_one_line_with_a_final_exit_code(tmp_path):
    folder = pictures(tmp_path / "photos", red=2)
    done = subprocess.run([sys.executable, "-m", "sd_tasks", "validate", f"--input={folder}",
                           f"--output={tmp_path}/out", f"--screen={spec('FlagRed')}", "--screen-policy=refuse"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 65, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "the screen flagged 2 photos (red-0.png: stand-in: red)" in line and "--screen-policy refuse" in line
    assert not (tmp_path / "out").exists()


def test_onnxruntime_neither_calls_home_nor_leaves_a_file_behind(tmp_path):
    """onnxruntime (1.29 on) starts Microsoft's telemetry on Linux and keeps a session file (`.ses`) in TMPDIR unless
    ORT_DISABLE_TELEMETRY is set before it starts. It runs the detector, and diffusers imports it to look up a
    pipeline's component classes (the `tiny-model` step did): the stack test found the file in a scratch folder."""
    import os

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = ("import os, sd_tasks; from diffusers.pipelines.onnx_utils import OnnxRuntimeModel; from PIL import Image; "
            "from sd_tasks.safety.screening import load_screen; "  # as a step: the library first, then diffusers
            "print(load_screen('nudenet').reason(Image.new('RGB', (64, 64))), os.environ['ORT_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["None", "1"], done.stderr
    assert [p.name for p in scratch.iterdir() if p.name != "torchinductor_root"] == []  # torch's compile cache aside
