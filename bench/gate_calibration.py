"""How often the promotion gate promotes a challenger that is no better than the champion, and how often one that is.

Drives the project's own selection and gate code (`select`'s scoring and ranking, `register.decide` and its cluster
bootstrap) with synthetic per-image scores, night after night, in the base model's units (its per-image spread is
1 for every metric). A model's score for an image of prompt p and seed s is

    shared(p, s) + effect(model) + candidate_by_prompt(model, p) + seed_noise(model, p, s)

`shared` is what the prompt and the seed draw for every model alike (the pairing removes it); a candidate's luck on
a prompt (`candidate_by_prompt`, standard deviation `prompt_effect`) persists over that prompt's seeds; `seed_noise`
(`seed_effect`) is each image's own. Fifteen candidates (3 learning rates x 5 checkpoints) are screened as the DAG
screens them by default (6 of the 13 selection prompts, 2 seeds, one class prompt; `--full-selection`: all 13 x 4),
the best is selected as `select` ranks them, then it, the champion and the base model are scored on the 12
held-out prompts with new seeds (4 each, the class prompts the same 12 with the class noun) and `decide` judges.
With `candidate_spread`, the candidates' true effects differ (drawn around the champion's): the regret is how much
better the truly best candidate was than the one selected. `--old` reproduces the gate before this one: the
confirmation on the selection prompts (a candidate's prompt luck carries over) with each image resampled alone.

    python bench/gate_calibration.py            # the table in docs/promotion.md
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_tasks.evaluation.compare import Yardstick  # noqa: E402
from sd_tasks.evaluation.scores import rank, scored_row  # noqa: E402
from sd_tasks.registry.register import decide  # noqa: E402

WEIGHTS = {"accuracy": 1.0, "flexibility": 1.0, "preservation": 0.5}  # the form's defaults
IMAGE_METRICS = ("dino", "clip_i", "clip_t")


@dataclass(frozen=True)
class Night:
    prompt_effect: float = 0.0  # candidate-by-prompt effects, in per-image spreads
    seed_effect: float = 0.5  # each image's own noise, in per-image spreads
    better: float = 0.0  # how much better than the champion one candidate truly is (0: all equal)
    candidate_spread: float = 0.0  # standard deviation of the candidates' true effects
    candidates: int = 15
    selection_prompts: int = 6  # screened on (the DAG's default screening_prompts; 13 with all selection prompts)
    confirmation_prompts: int = 12
    seeds: int = 2  # the DAG's default screening images per prompt
    confirmation_seeds: int = 4
    margin: float = 0.0
    confidence: float = 0.95
    old: bool = False  # the earlier gate: same prompts, images resampled one by one


class Suite:
    """Synthetic evaluations of several models on one suite of prompts x seeds."""

    def __init__(self, rng, night: Night, prompts: int, seeds: int, class_prompts: int, name: str):
        self.rng, self.night, self.shape, self.class_shape, self.name = rng, night, (prompts, seeds), \
            (class_prompts, seeds), name
        shared_sd = np.sqrt(max(1 - night.prompt_effect ** 2 - night.seed_effect ** 2, 0.0))
        self.shared = {m: rng.normal(0, shared_sd, self.shape) for m in IMAGE_METRICS}
        self.class_shared = rng.normal(0, shared_sd, self.class_shape)

    def evaluation(self, effect: float, luck: dict | None = None, **fields) -> dict:
        """One model's metrics.json on this suite; `luck` its candidate-by-prompt effects (drawn when None)."""
        n, rng = self.night, self.rng
        luck = luck or self.luck()
        per_image = {m: self.shared[m] + effect + luck[m][:, None] + rng.normal(0, n.seed_effect, self.shape)
                     for m in IMAGE_METRICS}
        preservation = 0.7 + self.class_shared + effect + luck["preservation"][:, None] + \
            rng.normal(0, n.seed_effect, self.class_shape)
        return self.metrics(per_image, preservation, fields)

    def base(self) -> dict:
        """The base model, a model like the others (its per-image spread is 1); its own images are the class images
        preservation compares with (1 exactly)."""
        luck = self.luck()
        per_image = {m: self.shared[m] + luck[m][:, None] + self.rng.normal(0, self.night.seed_effect, self.shape)
                     for m in IMAGE_METRICS}
        return self.metrics(per_image, np.ones(self.class_shape), {"base": True, "checkpoint": None,
                                                                   "class_similarity": 0.0})

    def luck(self) -> dict:
        return {m: self.rng.normal(0, self.night.prompt_effect, self.shape[0]) for m in IMAGE_METRICS} | \
            {"preservation": self.rng.normal(0, self.night.prompt_effect, self.class_shape[0])}

    def metrics(self, per_image: dict, preservation: np.ndarray, fields: dict) -> dict:
        result = {"suite": self.name, "per_image": {m: v.tolist() for m, v in per_image.items()},
                  "per_class_image": {"preservation": preservation.tolist()}, "champion_version": None,
                  "base": False, **fields}
        return result | {m: float(np.mean(v)) for m, v in per_image.items()} | \
            {"preservation": float(np.mean(preservation))}


def one_night(rng, night: Night) -> tuple[bool, bool, float]:
    """(promoted, the truly better candidate was selected, regret) for one simulated night."""
    selection = Suite(rng, night, night.selection_prompts, night.seeds, 1, "selection")
    lucks = [selection.luck() for _ in range(night.candidates)]
    effects = [(night.better if i == 0 else 0.0) + rng.normal(0, night.candidate_spread)
               for i in range(night.candidates)]
    yardstick = Yardstick.from_base(selection.base())
    rows = [scored_row(selection.evaluation(effects[i], lucks[i], checkpoint=f"c{i}", learning_rate=1e-4 * (1 + i % 3),
                                            step=100 * (1 + i // 3)), yardstick, WEIGHTS)
            for i in range(night.candidates)]
    best = rank(rows)[0]
    chosen = int(best["checkpoint"][1:])
    if night.old:  # the same prompts, new seeds: the selected candidate keeps its prompt luck
        confirmation = Suite(rng, night, night.selection_prompts, night.confirmation_seeds, 1, "confirmation")
        challenger_luck = lucks[chosen]
    else:
        confirmation = Suite(rng, night, night.confirmation_prompts, night.confirmation_seeds,
                             night.confirmation_prompts, "confirmation")
        challenger_luck = None  # prompts it was never chosen on: fresh luck
    evaluations = [confirmation.base(),
                   confirmation.evaluation(effects[chosen], challenger_luck, checkpoint=best["checkpoint"]),
                   confirmation.evaluation(0.0, champion_version=1, checkpoint="champion")]
    if night.old:  # each image its own cluster: the bootstrap over images
        for e in evaluations:
            for group in ("per_image", "per_class_image"):
                e[group] = {m: np.reshape(v, (-1, 1)).tolist() for m, v in e[group].items()}
    decision = decide("1", "2", best, evaluations, WEIGHTS, night.confidence, night.margin)
    return decision.eligible, chosen == 0, max(effects) - effects[chosen]


def rates(night: Night, nights: int, seed: int = 0) -> dict:
    """The promotion rate, how often the better candidate was selected and the mean regret over `nights` nights."""
    rng = np.random.default_rng(seed)
    outcomes = np.array([one_night(rng, night) for _ in range(nights)])
    return {"promoted": float(outcomes[:, 0].mean()), "selected_better": float(outcomes[:, 1].mean()),
            "regret": float(outcomes[:, 2].mean()), "nights": nights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=2000)
    parser.add_argument("--old", action="store_true", help="the earlier gate, for comparison")
    parser.add_argument("--full-selection", action="store_true", help="select on all 13 prompts x 4 seeds")
    parser.add_argument("--regret", action="store_true", help="screening against full selection: regret, power")
    args = parser.parse_args()
    if args.regret:
        return regret_table(args.nights)
    size = {"selection_prompts": 13, "seeds": 4} if args.full_selection or args.old else {}
    print("| prompt effect | seed noise | truly better by | margin | promoted | better one selected |")
    print("|---|---|---|---|---|---|")
    for better in (0.0, 0.25, 0.5):
        for prompt_effect in (0.0, 0.2, 0.4, 0.5):
            for margin in (0.0, 0.1):
                night = Night(prompt_effect=prompt_effect, seed_effect=0.5, better=better, margin=margin,
                              old=args.old, **size)
                r = rates(night, args.nights)
                print(f"| {prompt_effect:g} | 0.5 | {better:g} | {margin:g} | {r['promoted']:.1%} | "
                      f"{r['selected_better']:.0%} |" if better else
                      f"| {prompt_effect:g} | 0.5 | - | {margin:g} | {r['promoted']:.1%} | - |", flush=True)


def regret_table(nights: int) -> None:
    """Screening (6 prompts x 2 seeds) against selecting on every selection prompt (13 x 4): regret when the
    candidates' true effects differ, and power when one is better (prompt effect 0.2, seed noise 0.5)."""
    print("| selection | candidates' spread | one better by | margin | regret | better one selected | promoted |")
    print("|---|---|---|---|---|---|---|")
    for name, size in (("screening 6 x 2", {}), ("all 13 x 4", {"selection_prompts": 13, "seeds": 4})):
        for spread, better, margin in ((0.25, 0.0, 0.1), (0.5, 0.0, 0.1), (0.0, 0.25, 0.1), (0.0, 0.5, 0.1),
                                       (0.0, 0.25, 0.0)):
            r = rates(Night(prompt_effect=0.2, candidate_spread=spread, better=better, margin=margin, **size), nights)
            print(f"| {name} | {spread:g} | {better:g} | {margin:g} | {r['regret']:.3f} | "
                  f"{r['selected_better']:.0%} | {r['promoted']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
