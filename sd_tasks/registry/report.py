"""What a reviewer reads about a registration: `report.md` on the pipeline's MLflow run, and the approval page's
markdown (Airflow's Required actions page renders it; images only by a URL the reviewer's browser can load, so the
grids come from the MLflow server).
"""
from __future__ import annotations

from sd_tasks.core import tracking
from sd_tasks.evaluation.compare import METRICS, describe
from sd_tasks.evaluation.select import format_table, row_label


def status(result: dict) -> str:
    return ("Waiting for a reviewer's approval" if result.get("awaiting_approval") else
            "Promoted to champion" if result["promoted"] else "Not promoted")


def report(name: str, selection: dict, result: dict) -> str:
    """The page a reviewer opens first in MLflow: the decision, the paired comparison, and the sweep's tables."""
    best = selection["selected"]
    lines = [
        f"# {name}: learning rate {best['learning_rate']:g}, step {best['step']}",
        "",
        f"Registered as version {result['version']} ({', '.join(result['aliases'])}). {status(result)}: "
        f"{result['reason']}.",
        "",
        "The decision was taken on the confirmation suite (prompts and seeds selection never saw), image by image, "
        "the prompts resampled with their seeds: "
        + (describe(result["comparison"]) if result.get("comparison") else "no comparison") + ".",
        "",
        f"Scores on the selection suite: raw metrics, then the weighted score of metrics normalised against the base "
        f"model (units of its per-image spread; weights {weights(selection)}).",
        "",
        "```",
        format_table(selection),
        "```",
        "",
        "The same, every metric normalised (the base model's mean is 0, its per-image spread 1):",
        "",
        "```",
        format_table(selection, normalised=True),
        "```",
        "",
        "Runners-up: " + ("; ".join(f"lr {r['learning_rate']:g} step {r['step']} ({r['score']:+.2f})"
                                    for r in selection["runners_up"]) or "none") + ".",
        "",
        "Image grids (rows: learning rate, the champion and the base model; columns: step) and metric plots are under "
        "`review/`.",
    ]
    if effects := selection.get("prompt_effects"):
        lines += ["", f"Prompt effects in this sweep (a checkpoint's luck with particular prompts, which the held-out "
                      f"prompts of the confirmation guard against): {effects['prompt_effect']:.2f} of a per-image "
                      f"spread per metric, beside per-seed noise of {effects['seed_noise']:.2f} ({effects['candidates']} "
                      f"checkpoints x {effects['prompts']} prompts x {effects['seeds']} seeds). The gate's error rate "
                      f"is measured for prompt effects up to 0.5 (docs/promotion.md)."]
    if selection.get("halving"):
        from sd_tasks.evaluation.halving import describe as describe_halving

        lines += ["", "Successive halving (learning rates ranked by their normalised score at each rung):", "",
                  describe_halving(selection["halving"])]
    if result.get("cost"):
        from sd_tasks.core.cost import evaluation_against_training, table

        lines += ["", f"Cost of the night up to this registration (every try of every step once; GPU-hour at "
                      f"{result['cost']['gpu_hour_price']:g}):", "", table(result["cost"]), "",
                  evaluation_against_training(result["cost"])]
    if selection.get("missing"):
        lines += ["", f"Not evaluated (their evaluate task failed): {', '.join(selection['missing'])}."]
    lines += ["", screened(selection)]
    return "\n".join(lines) + "\n"


def screened(selection: dict) -> str:
    """What the screen flagged among the selection's evaluation images (sd_tasks.safety.screening)."""
    rows = [r for r in selection["table"] + [selection.get("champion"), selection.get("base")] if r]
    flagged = [f"{row_label(r)}: {r['flagged']} of {r.get('screened') or '?'}" for r in rows if r.get("flagged")]
    total = sum(r.get("screened") or 0 for r in rows)
    if flagged:
        return (f"The screen flagged evaluation images ({'; '.join(flagged)}): a checkpoint with flagged images "
                f"above register's --max-flagged is not promoted (docs/safety.md).")
    return f"The screen flagged none of the {total} evaluation images (docs/safety.md)."



def review(name: str, selection: dict, result: dict, parent_run_id: str | None, review_url: str | None) -> str:
    """The approval page: the decision, a table of the rows that matter (raw, and normalised in brackets), and the
    grids as images from the MLflow server (`review_url`, else the tracking URI when it is http)."""
    best = selection["selected"]
    rows = [("selected", best), *((f"runner-up {i}", r) for i, r in enumerate(selection["runners_up"], 1)),
            *(((f"champion v{selection['champion']['champion_version']}", selection["champion"]),)
              if selection.get("champion") else ()), ("base model", selection["base"])]
    table = ["| | " + " | ".join(METRICS) + " | score |", "|---" * (len(METRICS) + 2) + "|"]
    for label, r in rows:
        where = f" (lr {r['learning_rate']:g}, step {r['step']})" if r.get("learning_rate") is not None else ""
        cells = [f"{r[m]:.4f} ({r['norm'][m]:+.2f})" if r.get(m) is not None and m in (r.get("norm") or {})
                 else "-" for m in METRICS]
        score = f"{r['score']:+.2f}" if r.get("score") is not None else "-"
        table.append(f"| {label}{where} | " + " | ".join(cells) + f" | {score} |")
    parts = [
        f"**Version {result['version']} of `{name}`**: learning rate {best['learning_rate']:g}, step {best['step']}.",
        f"**{status(result)}**: {result['reason']}.",
        "Decided on the confirmation suite (prompts and seeds selection never saw), image by image. Below, the "
        "selection suite's scores: "
        f"raw, and in brackets normalised against the base model (weights {weights(selection)}).",
        "\n".join(table),
    ]
    base_url = review_url or (tracking.tracking_uri() if tracking.tracking_uri().startswith("http") else None)
    if not (base_url and parent_run_id):
        return "\n\n".join([*parts, "The grids are in the MLflow run's artifacts, under `review/`."]) + "\n"
    base_url = base_url.rstrip("/")
    grids = [f"![grid: {prompt}]({base_url}/get-artifact?path=review/grid-prompt-{j:02d}.png"  # titled with the prompt
             f"&run_uuid={parent_run_id})" for j, prompt in enumerate(selection.get("prompts", []))]
    experiment = tracking.client().get_run(parent_run_id).info.experiment_id
    return "\n\n".join([*parts, *grids, f"[The MLflow run, with report.md]({base_url}/#/experiments/{experiment}/"
                                          f"runs/{parent_run_id})"])


def weights(selection: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in selection["weights"].items())
