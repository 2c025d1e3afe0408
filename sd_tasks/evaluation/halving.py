"""Successive halving of a learning-rate sweep: at a rung, keep the best fraction of the learning rates.

Every learning rate trains to the rung and is evaluated; `halve` ranks them by the normalised score (sd_tasks.evaluation.select's,
against the base model's evaluation) of their checkpoint at the rung, keeps the best `keep` fraction (at least one)
and writes `rung-<step>.json` saying who was stopped, why, and what stopping them saves: the rest of their steps at
the speed they trained (each checkpoint carries its training seconds). The survivors then resume from that
checkpoint, so no step is trained twice. Ranked on the rung's checkpoint, not the best so far: a rate that peaked
early keeps its early checkpoints as candidates for `select`, but has shown it will not improve by training on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import is_whole, join, list_dir, read_json, write_dir, write_json
from sd_tasks.evaluation.scores import read_evaluations, score_weights, scored_row
from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO


@dataclass
class HalveConfig:
    """Rank the learning rates by their evaluated checkpoint at a rung; keep the best fraction; say who stopped."""

    evaluations: str = option("folder of the sweep's evaluations (evaluate's outputs, the base model's too) (URI)")
    output: str = option("folder to write rung-<step>.json to (URI); earlier rungs' files are kept")
    learning_rates: list[float] = option("the learning rates still training (those that reached the rung)", above=0)
    rung: int = option("the step every learning rate has reached and is judged at", at_least=1, at_most=100_000)
    max_steps: int = option("the step survivors train to: what a stopped rate would have trained",
                            at_least=1, at_most=100_000)
    keep: float = option("fraction of the learning rates to keep (at least one is kept)", 0.5, above=0, at_most=1)
    weight_accuracy: float = option("weight of subject fidelity (DINO, CLIP-I)", 1.0, at_least=0)
    weight_flexibility: float = option("weight of prompt fidelity (CLIP-T)", 1.0, at_least=0)
    weight_preservation: float = option("weight of preservation of the base model", 0.5, at_least=0)


def run(config: HalveConfig) -> dict:
    weights = score_weights(config)
    _, evaluations, yardstick = read_evaluations(config.evaluations)
    at_rung = {m["learning_rate"]: m for m in evaluations.values() if m.get("step") == config.rung and not m.get("base")
               and not m.get("champion_version") and m.get("learning_rate") in config.learning_rates}
    if not at_rung:
        raise StepError(f"{config.evaluations}: no evaluation at step {config.rung} of learning rates "
                        f"{', '.join(f'{lr:g}' for lr in config.learning_rates)}")
    ranked = sorted(({"learning_rate": lr, "score": scored_row(m, yardstick, weights)["score"],
                      "checkpoint": m["checkpoint"]} for lr, m in at_rung.items()),
                    key=lambda r: (-(r["score"] if r["score"] is not None else -math.inf), r["learning_rate"]))
    count = max(1, math.ceil(config.keep * len(ranked)))
    kept, stopped = ranked[:count], ranked[count:]
    for row in stopped:
        row |= saved(row["checkpoint"], config.rung, config.max_steps)
    decision = {"rung": config.rung, "max_steps": config.max_steps, "keep": config.keep, "ranked": ranked,
                "kept": [r["learning_rate"] for r in kept], "stopped": [r["learning_rate"] for r in stopped],
                "unevaluated": sorted(set(config.learning_rates) - set(at_rung)),
                "saved_seconds": sum(r["saved_seconds"] for r in stopped),
                "saved_gpu_seconds": sum(r["saved_gpu_seconds"] for r in stopped)}
    with write_dir(join(config.output, f"rung-{config.rung}")) as out:
        write_json(out / "halving.json", decision)
    for lr in decision["unevaluated"]:
        print(f"warning: lr={lr:g} has no evaluation at step {config.rung}: stopped", flush=True)
    print(f"rung {config.rung}: keeping {', '.join(f'lr={lr:g}' for lr in decision['kept'])}; stopping "
          f"{', '.join(f'lr={lr:g}' for lr in decision['stopped']) or 'none'}", flush=True)
    return {k: decision[k] for k in ("rung", "kept", "stopped", "saved_seconds", "saved_gpu_seconds")}


def saved(checkpoint: str, rung: int, max_steps: int) -> dict:
    """What not training a stopped rate on to max_steps saves, at the speed it trained to the rung."""
    info = read_json(f"{checkpoint}/{CHECKPOINT_INFO}")
    per_step = info.get("train_seconds", 0.0) / max(rung, 1)
    seconds = per_step * (max_steps - rung)
    return {"saved_seconds": seconds, "saved_gpu_seconds": seconds * info.get("gpus", 0)}


def history(sweep: str) -> list[dict]:
    """Every rung's decision of one run, in step order ([] for a grid sweep or no folder)."""
    rungs = [read_json(join(sweep, n, "halving.json")) for n in list_dir(sweep)
             if n.startswith("rung-") and is_whole(join(sweep, n))]
    return sorted(rungs, key=lambda r: r["rung"])


def describe(rungs: list[dict]) -> str:
    """One line per rung for the report: who was stopped when, and what it saved against the full grid."""
    lines = []
    for r in rungs:
        stopped = ", ".join(f"lr {x['learning_rate']:g} ({x['score']:+.2f})" for x in r["ranked"]
                            if x["learning_rate"] in r["stopped"]) or "none"
        kept = ", ".join(f"lr {lr:g}" for lr in r["kept"])
        lines.append(f"- step {r['rung']}: kept {kept}; stopped {stopped}; saved {r['saved_seconds']:.0f} s of "
                     f"training ({r['saved_gpu_seconds']:.0f} GPU-seconds) against training them to {r['max_steps']}")
    total = sum(r["saved_gpu_seconds"] for r in rungs), sum(r["saved_seconds"] for r in rungs)
    if lines:
        lines.append(f"- in all: {total[1]:.0f} s of training, {total[0]:.0f} GPU-seconds saved against the full grid")
    return "\n".join(lines)
