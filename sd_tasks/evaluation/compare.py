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
per-image differences. Its confidence interval comes from a bootstrap that resamples prompts, each with all of its
seeds (a cluster bootstrap): the images of one prompt share what a checkpoint happens to do with that prompt, so
treating them as independent would make the interval too narrow. Generated images and class images (preservation)
are resampled separately, each by its own prompts. With a dozen prompts a percentile interval is still too narrow, so
each part's resampled deviations are scaled to the unbiased variance (n / (n - 1)) and the tails are read at the
level a Student t with n - 1 degrees of freedom gives (the "expanded percentile" interval). A part measured on fewer
than two prompts has no interval and is left out, said in the comparison. A promotion needs the whole interval above
a margin: a challenger that differs from the champion by noise has an interval around zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sd_tasks.core.errors import StepError

PARTS = {"accuracy": ("dino", "clip_i"), "flexibility": ("clip_t",), "preservation": ("preservation",)}
METRICS = ("dino", "clip_i", "clip_t", "preservation")
SCALE_FLOOR = 1e-3  # a spread below this says the suite's images hardly differ; dividing by less would amplify noise
RESAMPLES = 4000  # enough for the 2.5% and 97.5% percentiles to settle to about 0.01 of the interval's width
MIN_PROMPTS = 2  # a part's interval needs its prompts to vary; with fewer it is left out of the comparison
GROUPS = {"images": ("accuracy", "flexibility"), "class images": ("preservation",)}  # each resampled by its prompts


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
        """Per part, the normalised per-image scores as a (prompts, seeds) array: accuracy and flexibility over the
        generated images, preservation over the class images."""
        z = {}
        for group in ("per_image", "per_class_image"):
            for metric, rows in (evaluation.get(group) or {}).items():
                if metric in self.centre:
                    z[metric] = (np.asarray(rows, dtype=float).reshape(len(rows), -1) - self.centre[metric]) / \
                        self.scale[metric]
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
    """The challenger's weighted score minus the reference's, image by image on their common suite, with a cluster
    bootstrap interval (prompts resampled with their seeds; see the module docstring). Both are evaluate's
    metrics.json. The result says what the interval rests on: prompts and images per group, and the parts left
    out."""
    from scipy import stats

    for name, evaluation in (("challenger", challenger), ("reference", reference)):
        if evaluation.get("suite") != yardstick.suite:
            raise StepError(f"{name} was evaluated on suite {evaluation.get('suite')}, the base model on "
                            f"{yardstick.suite}: images can only be paired within one suite")
    a, b = yardstick.per_image(challenger), yardstick.per_image(reference)
    measured = [p for p in PARTS if p in a and p in b and weights.get(p)]
    parts = [p for p in measured if len(a[p]) >= MIN_PROMPTS]
    if not parts:
        raise StepError(f"no score part with a positive weight was measured on at least {MIN_PROMPTS} prompts for "
                        f"both: nothing to compare")
    total = sum(weights[p] for p in parts)
    rng = np.random.default_rng(seed)  # fixed: the same evaluations always get the same interval
    estimate, deviations, rests_on, fewest = 0.0, np.zeros(resamples), {}, None
    for group, members in GROUPS.items():
        members = [p for p in parts if p in members]
        if not members:
            continue
        diffs = sum(weights[p] / total * (a[p] - b[p]) for p in members)  # (prompts, seeds): this group's share
        prompts = len(diffs)
        share = float(diffs.mean())
        drawn = rng.integers(0, prompts, size=(resamples, prompts))
        deviations += (diffs.mean(axis=1)[drawn].mean(axis=1) - share) * np.sqrt(prompts / (prompts - 1))
        estimate += share
        rests_on[group] = {"prompts": prompts, "images": int(diffs.size)}
        fewest = prompts if fewest is None else min(fewest, prompts)
    tail = stats.norm.cdf(stats.t.ppf((1 - confidence) / 2, fewest - 1))  # the expanded percentile's tail
    low, high = estimate + np.quantile(deviations, [tail, 1 - tail])
    return {"difference": estimate, "low": float(low), "high": float(high), "confidence": confidence,
            "parts": parts, "left_out": [p for p in measured if p not in parts], "rests_on": rests_on,
            "images": rests_on.get("images", {}).get("images", 0)}


def describe(comparison: dict) -> str:
    """'+0.420 (95% interval +0.100 to +0.710, on 12 prompts (48 images) and 12 class prompts (48 class images))'."""
    rests_on = comparison.get("rests_on") or {"images": {"prompts": None, "images": comparison["images"]}}
    on = " and ".join(f"{n['images']} {group}" if n["prompts"] is None else
                      f"{n['prompts']} {'class ' * (group != 'images')}prompts ({n['images']} {group})"
                      for group, n in rests_on.items())
    left_out = f"; {', '.join(comparison['left_out'])} left out (fewer than {MIN_PROMPTS} prompts)" \
        if comparison.get("left_out") else ""
    return (f"{comparison['difference']:+.3f} ({comparison['confidence']:.0%} interval {comparison['low']:+.3f} to "
            f"{comparison['high']:+.3f}, on {on}{left_out})")


def prompt_effects(candidates: list[dict], yardstick: Yardstick) -> dict | None:
    """How large the candidates' luck with particular prompts is in this sweep, beside each image's own noise: per
    metric of the generated images (DINO, CLIP-I, CLIP-T, normalised), the standard deviations of the
    candidate-by-prompt effect and of the per-seed noise, from a two-way layout with seeds as replicates; their mean
    over the metrics. The gate's calibration (docs/promotion.md) is measured for prompt effects up to 0.5 per metric;
    this says where a real sweep lies. None with fewer than 2 candidates, prompts or seeds."""
    estimates, shape = [], None
    for metric in ("dino", "clip_i", "clip_t"):
        rows = [c.get("per_image", {}).get(metric) for c in candidates]
        if metric not in yardstick.centre or not rows or any(r is None for r in rows):
            continue
        y = (np.asarray(rows, dtype=float) - yardstick.centre[metric]) / yardstick.scale[metric]
        if y.ndim != 3 or min(y.shape) < 2:  # candidates x prompts x seeds
            return None
        estimates.append(components(y))
        shape = y.shape
    if not estimates:
        return None
    count, prompts, seeds = shape
    return {"prompt_effect": float(np.mean([e[0] for e in estimates])),
            "seed_noise": float(np.mean([e[1] for e in estimates])),
            "candidates": count, "prompts": prompts, "seeds": seeds}


def components(y: np.ndarray) -> tuple[float, float]:
    """(candidate-by-prompt, per-seed) standard deviations of scores y[candidate, prompt, seed]: what every
    candidate drew alike for a prompt and seed, and each candidate's own level, removed first."""
    count, prompts, seeds = y.shape
    r = y - y.mean(axis=0)
    r = r - r.mean(axis=(1, 2), keepdims=True)
    cells = r.mean(axis=2)
    seed_noise = (r - cells[:, :, None]).var(axis=2, ddof=1).mean() * count / (count - 1)
    interaction = (cells ** 2).mean() * count * prompts / ((count - 1) * (prompts - 1)) - seed_noise / seeds
    return float(np.sqrt(max(interaction, 0.0))), float(np.sqrt(seed_noise))
