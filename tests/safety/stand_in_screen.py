"""Stand-in screens that only the tests inject (`--screen tests/safety/stand_in_screen.py:NAME`): what happens to a
flagged image is tested without any explicit material in the repository. Constructed with the threshold, like every
screen (sd_tasks.safety.screening.load_screen)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def spec(name: str) -> str:
    return f"{HERE}:{name}"


class FlagAll:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def reason(self, image) -> str | None:
        return f"stand-in: every image ({self.threshold:g})"


class FlagRed:
    """Flags a mostly red picture: the tests' stand-in for a photo the detector would flag."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def reason(self, image) -> str | None:
        r, g, b = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)
        return "stand-in: red" if r > 150 and g < 100 and b < 100 else None
