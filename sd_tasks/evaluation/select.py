"""Pick the best checkpoint of a sweep from the evaluation results, and show the sweep to a reviewer.

Every metric is first normalised against the base model's evaluation on the same suite (sd_tasks.evaluation.compare: units
of the base model's per-image spread), then score = weighted mean of accuracy (DINO and CLIP-I, subject fidelity),
flexibility (CLIP-T, prompt fidelity) and preservation (the base model kept), over the parts that were measured.
Ties go to the earlier step, which is cheaper and less overfit. A re-evaluated champion (evaluate's
`champion_version`) is scored the same way and kept apart for the report; the promotion itself is decided by
`register` on new seeds (the confirmation suite), not on the seeds that chose the winner. With a parent MLflow run,
the run gets a labelled image grid per evaluation prompt and a plot per metric against step (sd_tasks.evaluation.review).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

from sd_tasks.core import tracking
from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import is_whole, join, list_dir, write_dir, write_json
from sd_tasks.evaluation.compare import METRICS, prompt_effects
from sd_tasks.evaluation.halving import history
from sd_tasks.evaluation.scores import rank, read_evaluations, score_weights, scored_row

@dataclass
class SelectConfig:
    """Score every evaluated checkpoint; write selection.json naming the best one."""

    evaluations: str = option("folder whose sub-folders hold evaluate's metrics.json (URI)")
    output: str = option("URI to write selection.json to")
    weight_accuracy: float = option("weight of subject fidelity (DINO, CLIP-I)", 1.0, at_least=0)
    weight_flexibility: float = option("weight of prompt fidelity (CLIP-T)", 1.0, at_least=0)
    weight_preservation: float = option("weight of preservation of the base model", 0.5, at_least=0)
    parent_run_id: str | None = option("MLflow run to log the grids and plots to", None)
    sweep: str | None = option("folder of successive halving's rung decisions (halve's output), for the report", None)
    expected: list[str] = option("evaluation folders the pipeline planned (URIs; a training run's holds one folder "
                                 "per checkpoint): those that are not whole are reported as missing (their evaluate "
                                 "task failed) and the rest selected from", [])


def run(config: SelectConfig) -> dict:
    weights = score_weights(config)
    folder, evaluations, yardstick = read_evaluations(config.evaluations)
    base = next(m for m in evaluations.values() if m.get("base"))
    rows = [scored_row(m, yardstick, weights) for m in evaluations.values()]
    candidates = sorted((r for r in rows if not (r["champion_version"] or r["base"])
                         and r["suite"] == base.get("suite")), key=lambda r: (r["learning_rate"], r["step"]))
    if not candidates:
        raise StepError(f"{config.evaluations}: no metrics.json of a checkpoint on the base model's suite found; "
                        f"did evaluate run?")
    ranking = rank(candidates)
    champion = next((r for r in rows if r["champion_version"]), None)
    missing = missing_evaluations(config, folder, evaluations)
    if missing:
        print(f"warning: not evaluated, selected from the rest: {', '.join(missing)}", file=sys.stderr)
    selection = {"selected": ranking[0], "runners_up": ranking[1:3], "table": candidates, "champion": champion,
                 "base": next(r for r in rows if r["base"]), "weights": weights, "missing": missing,
                 "normalisation": {"centre": yardstick.centre, "scale": yardstick.scale}, "prompts": base["prompts"],
                 "prompt_effects": prompt_effects([evaluations[f] for f in candidate_folders(evaluations, candidates)],
                                                  yardstick),
                 "halving": halving_history(config.sweep)}
    with write_dir(config.output) as out:
        write_json(out / "selection.json", selection)
    for row in candidates:  # MLflow's model search ranks the sweep by the score only select can compute
        if row["run_id"]:
            tracking.log_checkpoint_model(row["run_id"], step=row["step"], learning_rate=row["learning_rate"],
                                          uri=row["checkpoint"], metrics={"score": row["score"], **{
                                              f"normalised_{k}": v for k, v in row["norm"].items()}})
    if config.parent_run_id:
        from sd_tasks.evaluation.review import log_review

        log_review(config.parent_run_id, evaluations, candidates)
    return {"selection": f"{config.output}/selection.json", "selected": ranking[0], "candidates": len(candidates),
            "missing": missing}


def candidate_folders(evaluations: dict[str, dict], candidates: list[dict]) -> list[str]:
    """The folders of the candidates' evaluations (those scored on the base model's suite)."""
    chosen = {r["checkpoint"] for r in candidates}
    return [f for f, m in evaluations.items() if m.get("checkpoint") in chosen and not m.get("champion_version")]


def halving_history(sweep: str | None) -> list[dict]:
    return history(sweep) if sweep else []


def missing_evaluations(config: SelectConfig, folder, evaluations: dict) -> list[str]:
    """The planned evaluations that are not whole: a planned folder with no evaluation at or under it, and each
    checkpoint of an evaluated training run (`evaluate --training-run` writes one folder per step) that has none."""
    found = {f.removeprefix(folder + "/"): m for f, m in evaluations.items()}
    root = config.evaluations.rstrip("/") + "/"
    missing = []
    for planned in (uri.removeprefix(root) for uri in config.expected):
        under = [name for name in found if name == planned or name.startswith(planned + "/")]
        if not under:
            missing.append(planned)
        elif planned not in found:  # a training run's folder: did every whole checkpoint of it get evaluated?
            trained = {found[name]["checkpoint"].rstrip("/").rsplit("/", 1)[0] for name in under}
            steps = {int(name.removeprefix("checkpoint-")) for run in trained for name in list_dir(run)
                     if re.fullmatch(r"checkpoint-\d+", name) and is_whole(join(run, name))}
            missing += [f"{planned}/step-{s}" for s in sorted(steps) if f"{planned}/step-{s}" not in found]
    return missing


def row_label(row: dict) -> str:
    """A row of the sweep's table as a reviewer reads it: `lr 0.0001 @400`, `champion v3` or `base model`."""
    if row.get("base"):
        return "base model"
    if row.get("champion_version"):
        return f"champion v{row['champion_version']}"
    return f"lr {row['learning_rate']:g} @{row['step']}"


def format_table(selection: dict, normalised: bool = False) -> str:
    """The sweep as a small text table (raw metrics, or normalised ones, then the normalised score), the selected
    row marked, the champion and the base model last."""
    best = selection["selected"]
    lines = [f"{'':>16} {'dino':>7} {'clip_i':>7} {'clip_t':>7} {'preserv':>7} {'score':>7}"]
    extra = [r for r in (selection.get("champion"), selection.get("base")) if r]
    for r in selection["table"] + extra:
        name = row_label(r)
        mark = "  <- selected" if not (r.get("base") or r.get("champion_version")) and \
            (r["learning_rate"], r["step"]) == (best["learning_rate"], best["step"]) else ""
        values = r.get("norm") or {} if normalised else r
        cells = " ".join((f"{values[m]:>+7.2f}" if normalised else f"{values[m]:>7.4f}")
                         if values.get(m) is not None else f"{'-':>7}" for m in METRICS)
        score = f"{r['score']:>+7.2f}" if r.get("score") is not None else f"{'-':>7}"
        lines.append(f"{name:>16} {cells} {score}{mark}")
    return "\n".join(lines)
