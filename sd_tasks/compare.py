"""Scores that can be weighed together, and the paired comparison that decides a promotion.

**Normalised scores.** The raw metrics move on different scales: CLIP-T by hundredths, DINO by tenths. Each is
therefore expressed relative to the base model evaluated on the same suite (same prompts, seeds and instance
images), in units of how much it varies there:

- dino, clip_i, clip_t: (score - the base model's mean) / the spread (standard deviation) of the base model's
  per-image scores. +1 means "one typical image-to-image difference better than the untuned model".
- preservation: (preservation - 1) / (1 - class similarity), where class similarity is how alike two draws of the
  class prompt are for the base model. 0 means the class is drawn as without the LoRA, -1 means as different as
  another draw of the base model.

So a weight of 1 on prompt fidelity and 1 on subject fidelity mean what the form says. The weighted score is the
weighted mean of accuracy (normalised DINO and CLIP-I, averaged), flexibility (normalised CLIP-T) and
preservation, over the parts that were measured.

**Paired comparison.** Two evaluations on one suite scored the same images' prompts and seeds, so they are compared
image by image: the weighted score is linear in the per-image scores, so its difference is a weighted mean of
per-image differences. A percentile bootstrap over the images (generated images and class images resampled
separately, each with the pairing kept) gives a confidence interval of the mean difference. A promotion needs the
whole interval above a margin: a challenger that differs from the champion by noise has an interval around zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sd_tasks.errors import StepError

PARTS = {"accuracy": ("dino", "clip_i"), "flexibility": ("clip_t",), "preservation": ("preservation",)}
METRICS = ("dino", "clip_i", "clip_t", "preservation")
SCALE_FLOOR = 1e-3  # a spread below this says the suite's images hardly differ; dividing by less would amplify noise
RESAMPLES = 4000  # enough for the 2.5% and 97.5% percentiles to settle to about 0.01 of the interval's width


@dataclass(frozen=True)
class Yardstick:
    """The base model's scores on a suite: the centre and scale each metric is normalised by."""

    suite: str
    centre: dict[str, float]
    scale: dict[str, float]

    @classmethod
    def from_base(cls, base: dict, where: str = "the base model's evaluation") -> Yardstick:
        if not base.get("per_image"):
            raise StepError(f"{where}: no per-image scores (evaluated by an older version): evaluate it again")
        centre, scale = {}, {}
        for metric, rows in base["per_image"].items():
            values = np.asarray(rows, dtype=float).ravel()
            centre[metric], scale[metric] = float(values.mean()), max(float(values.std()), SCALE_FLOOR)
        if base.get("per_class_image"):
            alike = base.get("class_similarity")
            centre["preservation"] = 1.0  # the base model preserves itself exactly
            scale["preservation"] = max(1.0 - alike, SCALE_FLOOR) if alike is not None else 1.0
        return cls(base.get("suite"), centre, scale)

    def normalise(self, metrics: dict) -> dict[str, float]:
        """Each measured metric's mean, normalised."""
        return {m: (metrics[m] - self.centre[m]) / self.scale[m] for m in METRICS
                if metrics.get(m) is not None and m in self.centre}

    def per_image(self, evaluation: dict) -> dict[str, np.ndarray]:
        """Per part, the normalised per-image scores: accuracy and flexibility over the generated images (in one
        order: prompt, then seed), preservation over the class images."""
        z = {}
        for group in ("per_image", "per_class_image"):
            for metric, rows in (evaluation.get(group) or {}).items():
                if metric in self.centre:
                    z[metric] = (np.asarray(rows, dtype=float).ravel() - self.centre[metric]) / self.scale[metric]
        return {part: np.mean([z[m] for m in metrics], axis=0) for part, metrics in PARTS.items()
                if all(m in z for m in metrics)}


def weighted_score(normalised: dict, weights: dict) -> float:
    """Weighted mean of accuracy, flexibility and preservation over the parts measured (normalised metrics)."""
    parts = {"accuracy": (normalised["dino"] + normalised["clip_i"]) / 2, "flexibility": normalised["clip_t"],
             "preservation": normalised.get("preservation")}
    measured = {k: v for k, v in parts.items() if v is not None and weights.get(k)}
    if not measured:
        return float("-inf")
    return sum(weights[k] * v for k, v in measured.items()) / sum(weights[k] for k in measured)


def paired_difference(challenger: dict, reference: dict, yardstick: Yardstick, weights: dict, confidence: float,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The challenger's weighted score minus the reference's, image by image on their common suite, with a
    bootstrap confidence interval. Both are evaluate's metrics.json."""
    for name, evaluation in (("challenger", challenger), ("reference", reference)):
        if evaluation.get("suite") != yardstick.suite:
            raise StepError(f"{name} was evaluated on suite {evaluation.get('suite')}, the base model on "
                            f"{yardstick.suite}: images can only be paired within one suite")
    a, b = yardstick.per_image(challenger), yardstick.per_image(reference)
    parts = [p for p in PARTS if p in a and p in b and weights.get(p)]
    if not parts:
        raise StepError("no score part with a positive weight was measured for both: nothing to compare")
    total = sum(weights[p] for p in parts)
    rng = np.random.default_rng(seed)  # fixed: the same evaluations always get the same interval
    estimate, draws = 0.0, np.zeros(resamples)
    for group in (("accuracy", "flexibility"), ("preservation",)):  # images of one group are resampled together
        members = [p for p in parts if p in group]
        if not members:
            continue
        diffs = sum(weights[p] / total * (a[p] - b[p]) for p in members)  # per image, this group's share
        estimate += float(diffs.mean())
        draws += diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"difference": estimate, "low": float(low), "high": float(high), "confidence": confidence,
            "parts": parts, "images": int(len(next(iter(a.values()))))}


def describe(comparison: dict) -> str:
    """'+0.42 (95% interval +0.10 to +0.71)'."""
    return (f"{comparison['difference']:+.3f} ({comparison['confidence']:.0%} interval {comparison['low']:+.3f} to "
            f"{comparison['high']:+.3f}, {comparison['images']} images)")
