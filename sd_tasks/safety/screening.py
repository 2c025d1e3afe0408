"""Screening images for sexual content: training photos going in, generated images coming out.

The default screen is NudeNet's detector (`nudenet`), whose small ONNX model ships inside its wheel and runs offline
on the CPU (onnxruntime, its telemetry switched off): about 0.2 s to load and 35 ms an image on a 2-core machine. An
image is flagged when the detector finds one of the exposed classes below at `threshold` or above. On the DreamBench
photos the detector's strongest finding on harmless images was 0.33 (a dog), hence the default of 0.5.

`--screen` picks the screen: `nudenet`, `off`, or `FILE.py:NAME` / `module:NAME`, a class of the operator's own
(another classifier) constructed with the threshold and answering `reason(image) -> str | None` like NudeNetScreen.
The suite's stand-in screens are such classes (tests/safety/stand_in_screen.py): no explicit material is needed to
test what happens to a flagged image.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Protocol

from PIL import Image

from sd_tasks.core.errors import StepError
from sd_tasks.safety.marking import bgr_array

UNSAFE_CLASSES = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "ANUS_EXPOSED",
                  "BUTTOCKS_EXPOSED")
DEFAULT_THRESHOLD = 0.5
SCREEN_HELP = "screen for images: nudenet (offline, in its wheel), off, or FILE.py:NAME / module:NAME of your own"


class Screen(Protocol):
    def reason(self, image: Image.Image) -> str | None:
        """Why `image` is flagged, in a few words; None when it is not."""


class NudeNetScreen:
    name = "nudenet"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        from nudenet import NudeDetector  # onnxruntime's telemetry is off (sd_tasks/__init__.py)

        self.detector, self.threshold = NudeDetector(), threshold

    def reason(self, image: Image.Image) -> str | None:
        found = [d for d in self.detector.detect(bgr_array(image)) if d["class"] in UNSAFE_CLASSES and d["score"] >= self.threshold]
        if not found:
            return None
        worst = max(found, key=lambda d: d["score"])
        return f"{self.name}: {worst['class']} {worst['score']:.2f}"


class NoScreen:
    name = "off"

    def reason(self, image: Image.Image) -> str | None:
        return None


def load_screen(spec: str, threshold: float = DEFAULT_THRESHOLD, setting: str = "--screen") -> Screen:
    """The screen `spec` names; a spec that names nothing loadable is one line."""
    if spec == "nudenet":
        return NudeNetScreen(threshold)
    if spec == "off":
        return NoScreen()
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise StepError(f"{setting} {spec!r}: choose nudenet, off, or FILE.py:NAME / module:NAME")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if module_spec is None or not Path(where).is_file():
                raise FileNotFoundError(where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        return getattr(module, name)(threshold)
    except (ImportError, FileNotFoundError, AttributeError, TypeError) as e:
        raise StepError(f"{setting} {spec!r}: cannot load it ({type(e).__name__}: {e})") from None


def screen_all(screen: Screen, images: list[Image.Image | None]) -> list[str | None]:
    """Each image's reason to be flagged (None: not flagged, or no image)."""
    return [None if image is None else screen.reason(image) for image in images]
