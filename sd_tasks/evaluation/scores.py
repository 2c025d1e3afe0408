"""A sweep's evaluations as scored rows: each metric normalised against the base model's evaluation on the same suite
(sd_tasks.evaluation.compare), then weighted into one score; shared by `select` (the whole sweep) and `halving` (a
rung)."""
from __future__ import annotations

from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import whole_jsons
from sd_tasks.evaluation.compare import METRICS, Yardstick, weighted_score

ROW_FIELDS = ("learning_rate", "step", "checkpoint", "run_id", "suite", "broken", "flagged", "screened",
              "champion_version", "base", *METRICS)


def rank(candidates: list[dict]) -> list[dict]:
    """Scored rows, best first; a tie goes to the earlier step (cheaper, less overfit), then the lower rate."""
    return sorted(candidates, key=lambda r: (-r["score"], r["step"], r["learning_rate"]))


def score_weights(config) -> dict[str, float]:
    """The weights of the score from a step's --weight-* options (select's, halve's), checked."""
    weights = {"accuracy": config.weight_accuracy, "flexibility": config.weight_flexibility,
               "preservation": config.weight_preservation}
    if any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise StepError("--weight-accuracy, --weight-flexibility, --weight-preservation: non-negative, not all zero")
    return weights


def read_evaluations(uri: str) -> tuple[str, dict[str, dict], Yardstick]:
    """The folder, its whole evaluations (an evaluate task killed while writing leaves a folder that is not) by
    folder URI, and the yardstick of the base model's evaluation among them. Only the metrics.json files are read,
    not the images beside them."""
    evaluations = whole_jsons(uri, "metrics.json")
    base = next((m for m in evaluations.values() if m.get("base")), None)
    if base is None:
        raise StepError(f"{uri}: no evaluation of the base model (evaluate without --checkpoint): scores are "
                        f"normalised against it")
    return uri.rstrip("/"), evaluations, Yardstick.from_base(base, f"{uri}: the base model's evaluation")


def scored_row(metrics: dict, yardstick: Yardstick, weights: dict) -> dict:
    """One evaluation as a row of the sweep: raw metrics, normalised ones (`norm`) and the weighted score."""
    row = {k: metrics.get(k) for k in ROW_FIELDS}
    row["norm"] = yardstick.normalise(metrics) if metrics.get("suite") == yardstick.suite else {}
    row["score"] = weighted_score(row["norm"], weights) if row["norm"] else None  # another suite: not comparable
    return row
