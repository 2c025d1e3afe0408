"""Pick the best checkpoint of a sweep from the evaluation results, and show the sweep to a reviewer.

score = weighted mean of accuracy = (DINO + CLIP-I) / 2 (subject fidelity), flexibility = CLIP-T (prompt fidelity)
and preservation (the base model kept), over the parts that were measured. Ties go to the earlier step, which is
cheaper and less overfit. A re-evaluated champion (evaluate's `champion_version`) is scored the same way and kept
apart, for `register` to compare against. With a parent MLflow run, the run gets an image grid per evaluation prompt
(learning rate by checkpoint) and a plot per metric against step.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.storage import read_dir, whole_folders, write_dir, write_json

METRICS = ("dino", "clip_i", "clip_t", "preservation")


@dataclass
class SelectConfig:
    """Score every evaluated checkpoint; write selection.json naming the best one."""

    evaluations: str = option("folder whose sub-folders hold evaluate's metrics.json (URI)")
    output: str = option("URI to write selection.json to")
    weight_accuracy: float = option("weight of subject fidelity (DINO, CLIP-I)", 1.0)
    weight_flexibility: float = option("weight of prompt fidelity (CLIP-T)", 1.0)
    weight_preservation: float = option("weight of preservation of the base model", 0.5)
    parent_run_id: str | None = option("MLflow run to log the grids and plots to", None)
    expected: list[str] = option("evaluation folders the pipeline planned (URIs): those that are not whole are "
                                 "reported as missing (their evaluate task failed) and the rest selected from", [])


def run(config: SelectConfig) -> dict:
    weights = {"accuracy": config.weight_accuracy, "flexibility": config.weight_flexibility,
               "preservation": config.weight_preservation}
    if any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise StepError("--weight-accuracy, --weight-flexibility, --weight-preservation: non-negative, not all zero")
    folder = read_dir(config.evaluations)
    # whole evaluations only: an evaluate task killed while writing leaves a folder that is not
    evaluations = {f: json.loads((f / "metrics.json").read_text()) for f in whole_folders(folder)
                   if (f / "metrics.json").exists()}
    rows = [{**{k: r.get(k) for k in ("learning_rate", "step", "checkpoint", "run_id", "suite", "broken",
                                        "champion_version", *METRICS)}, "score": weighted_score(r, weights)}
            for r in evaluations.values()]
    candidates = sorted((r for r in rows if not r["champion_version"]), key=lambda r: (r["learning_rate"], r["step"]))
    if not candidates:
        raise StepError(f"{config.evaluations}: no metrics.json of a checkpoint found; did evaluate run?")
    ranking = sorted(candidates, key=lambda r: (-r["score"], r["step"], r["learning_rate"]))
    champion = next((r for r in rows if r["champion_version"]), None)
    found = {f.relative_to(folder).as_posix() for f in evaluations}
    root = config.evaluations.rstrip("/") + "/"
    missing = [uri.removeprefix(root) for uri in config.expected if uri.removeprefix(root) not in found]
    if missing:
        print(f"warning: not evaluated, selected from the rest: {', '.join(missing)}", file=sys.stderr)
    selection = {"selected": ranking[0], "runners_up": ranking[1:3], "table": candidates, "champion": champion,
                 "weights": weights, "missing": missing}
    with write_dir(config.output) as out:
        write_json(out / "selection.json", selection)
    if config.parent_run_id:
        log_review(config.parent_run_id, evaluations, candidates)
    return {"selection": f"{config.output}/selection.json", "selected": ranking[0], "candidates": len(candidates),
            "missing": missing}


def weighted_score(metrics: dict, weights: dict) -> float:
    parts = {"accuracy": (metrics["dino"] + metrics["clip_i"]) / 2, "flexibility": metrics["clip_t"],
             "preservation": metrics.get("preservation")}
    measured = {k: v for k, v in parts.items() if v is not None and weights[k]}
    if not measured:
        return -1.0
    return sum(weights[k] * v for k, v in measured.items()) / sum(weights[k] for k in measured)


def format_table(selection: dict) -> str:
    """The sweep as a small text table, the selected row marked, the champion last."""
    best = selection["selected"]
    lines = [f"{'lr':>8} {'step':>6} {'dino':>7} {'clip_i':>7} {'clip_t':>7} {'preserv':>7} {'score':>7}"]
    rows = selection["table"] + ([selection["champion"]] if selection.get("champion") else [])
    for r in rows:
        mark = "  <- selected" if r is not selection.get("champion") and (
            r["learning_rate"], r["step"]) == (best["learning_rate"], best["step"]) else ""
        if r is selection.get("champion"):
            mark = f"  current champion (v{r['champion_version']})"
        cells = " ".join(f"{r[m]:>7.4f}" if r.get(m) is not None else f"{'-':>7}" for m in METRICS)
        lines.append(f"{r['learning_rate']:>8g} {r['step']:>6} {cells} {r['score']:>7.4f}{mark}")
    return "\n".join(lines)


def log_review(run_id: str, evaluations: dict[Path, dict], rows: list[dict]) -> None:
    """On the parent run: per evaluation prompt a grid (rows: learning rate, columns: checkpoint step, first image
    of each), and per metric a plot against step with one line per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from sd_tasks import tracking

    client = tracking.client()
    by_key = {(m["learning_rate"], m["step"]): folder for folder, m in evaluations.items() if not m.get("champion_version")}
    lrs, steps = sorted({k[0] for k in by_key}), sorted({k[1] for k in by_key})
    prompts = next(iter(evaluations.values()))["prompts"]
    for j in range(len(prompts)):
        tiles = {k: folder / "images" / f"p{j:02d}-0.png" for k, folder in by_key.items()}
        size = next((Image.open(p).size for p in tiles.values() if p.exists()), (64, 64))
        grid = Image.new("RGB", (size[0] * len(steps), size[1] * len(lrs)), "white")
        for (lr, step), path in tiles.items():
            if path.exists():
                grid.paste(Image.open(path).convert("RGB"), (steps.index(step) * size[0], lrs.index(lr) * size[1]))
        client.log_image(run_id, grid, f"review/grid-prompt-{j:02d}.png")
    client.log_text(run_id, "\n".join(f"prompt-{j:02d}: {p}" for j, p in enumerate(prompts)) +
                    f"\nrows: learning rates {', '.join(f'{lr:g}' for lr in lrs)}; columns: steps {steps}\n",
                    "review/grids.txt")
    for metric in (*METRICS, "score"):
        if all(r.get(metric) is None for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for lr in lrs:
            points = sorted((r["step"], r[metric]) for r in rows if r["learning_rate"] == lr and r.get(metric) is not None)
            ax.plot(*zip(*points), marker="o", label=f"lr={lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        client.log_figure(run_id, fig, f"review/{metric}-vs-step.png")
        plt.close(fig)
