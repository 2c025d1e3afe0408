"""Pick the best checkpoint of a sweep from the evaluation results.

score = (w_accuracy * (DINO + CLIP-I) / 2 + w_flexibility * CLIP-T) / (w_accuracy + w_flexibility)
Accuracy is subject fidelity (does it look like the subject), flexibility is prompt fidelity (does it follow new
prompts). Ties go to the earlier step, which is cheaper and less overfit.
"""
from __future__ import annotations

from dataclasses import dataclass

from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.storage import read_dir, write_dir, write_json


@dataclass
class SelectConfig:
    """Score every evaluated checkpoint; write selection.json naming the best one."""

    evaluations: str = option("folder whose sub-folders hold evaluate's metrics.json (URI)")
    output: str = option("URI to write selection.json to")
    weight_accuracy: float = option("weight of subject fidelity (DINO, CLIP-I)", 1.0)
    weight_flexibility: float = option("weight of prompt fidelity (CLIP-T)", 1.0)


def run(config: SelectConfig) -> dict:
    import json

    folder = read_dir(config.evaluations)
    rows = [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]
    if not rows:
        raise StepError(f"{config.evaluations}: no metrics.json found; did evaluate run?")
    if config.weight_accuracy < 0 or config.weight_flexibility < 0 or not (config.weight_accuracy + config.weight_flexibility):
        raise StepError("--weight-accuracy and --weight-flexibility must be non-negative and not both zero")
    table = sorted(({**{k: r[k] for k in ("learning_rate", "step", "checkpoint", "run_id", "clip_t", "clip_i", "dino")},
                     "score": weighted_score(r, config)} for r in rows), key=lambda r: (r["learning_rate"], r["step"]))
    ranking = sorted(table, key=lambda r: (-r["score"], r["step"], r["learning_rate"]))
    selection = {"selected": ranking[0], "runners_up": ranking[1:3], "table": table,
                 "weights": {"accuracy": config.weight_accuracy, "flexibility": config.weight_flexibility}}
    with write_dir(config.output) as out:
        write_json(out / "selection.json", selection)
    return {"selection": f"{config.output}/selection.json", "selected": ranking[0], "candidates": len(table)}


def weighted_score(metrics: dict, config: SelectConfig) -> float:
    accuracy = (metrics["dino"] + metrics["clip_i"]) / 2
    total = config.weight_accuracy + config.weight_flexibility
    return (config.weight_accuracy * accuracy + config.weight_flexibility * metrics["clip_t"]) / total


def format_table(selection: dict) -> str:
    """The sweep as a small text table, the selected row marked."""
    best = selection["selected"]
    lines = [f"{'lr':>8} {'step':>6} {'dino':>7} {'clip_i':>7} {'clip_t':>7} {'score':>7}"]
    for r in selection["table"]:
        mark = "  <- selected" if (r["learning_rate"], r["step"]) == (best["learning_rate"], best["step"]) else ""
        lines.append(f"{r['learning_rate']:>8g} {r['step']:>6} {r['dino']:>7.4f} {r['clip_i']:>7.4f} "
                     f"{r['clip_t']:>7.4f} {r['score']:>7.4f}{mark}")
    return "\n".join(lines)
