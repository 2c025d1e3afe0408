"""Promotion you can trust: per-image scores, normalisation against the base model, the paired bootstrap gate on
confirmation seeds, and the first version's floor. Real evaluations of the tiny model where the claim is about the
pipeline; known per-image scores where it is about the statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sd_tasks.core import tracking
from sd_tasks.core.storage import write_dir
from sd_tasks.evaluation import compare, evaluate, select
from sd_tasks.registry import register
from sd_tasks.training import train

PROMPTS = ["a sks dog in the snow", "a red sks dog"]


def suite(prepared, models, seed: int = 0, images: int = 2) -> dict:
    return dict(instance_images=str(prepared / "resized"), prompts=PROMPTS, class_prompts=["a photo of dog"],
                clip_model=models["clip"], dino_model=models["dino"], base_model=models["sdxl"],
                images_per_prompt=images, num_inference_steps=2, seed=seed)


def evaluate_all(folder, checkpoints: dict[str, str | None], prepared, models, **kw) -> None:
    """Evaluate each named checkpoint (None: the base model) into folder/<name>."""
    for name, uri in checkpoints.items():
        evaluate.run(evaluate.EvaluateConfig(checkpoint=uri, output=str(folder / name), **suite(prepared, models, **kw)))


@pytest.fixture(scope="module")
def champion_run(prepared, cache, models, home, tmp_path_factory):
    """v1 of `dog-gate`: trained, evaluated, confirmed and registered as champion (margin -10: the tiny random
    evaluators cannot see a subject, so the floor is lowered on purpose to give the later tests a champion)."""
    root = tmp_path_factory.mktemp("gate")
    trained = train.run(train.TrainConfig(cache=cache, output=str(root / "train"), base_model=models["sdxl"],
                                          learning_rate=1e-3, max_steps=2, checkpointing_steps=2, experiment="gate"))
    checkpoint = trained["checkpoints"][-1]["uri"]
    evaluate_all(root / "eval", {"step-2": checkpoint, "base": None}, prepared, models)
    select.run(select.SelectConfig(evaluations=str(root / "eval"), output=str(root / "select")))
    evaluate_all(root / "confirm", {"challenger": checkpoint, "base": None}, prepared, models, seed=1_000_000, images=3)
    result = register.run(register.RegisterConfig(
        selection=str(root / "select"), dataset=str(prepared / "dataset"), model_name="dog-gate",
        output=str(root / "register"), confirmation=str(root / "confirm"), margin=-10))
    assert result["promoted"] and result["champion"] == 1, result
    return {"root": root, "checkpoint": checkpoint, "result": result}


def challenge(name: str, checkpoint: str, prepared, models, root, **register_options) -> dict:
    """A night that trained `checkpoint`: evaluate it beside the champion and the base model, select, confirm on new
    seeds, register."""
    champion = register.champion(register.ChampionConfig(model_name="dog-gate", output=str(root / name / "champion")))
    evaluate_all(root / name / "eval", {"step-2": checkpoint, "champion": champion["checkpoint"], "base": None},
                 prepared, models)
    select.run(select.SelectConfig(evaluations=str(root / name / "eval"), output=str(root / name / "select")))
    evaluate_all(root / name / "confirm", {"challenger": checkpoint, "champion": champion["checkpoint"], "base": None},
                 prepared, models, seed=1_000_000, images=3)
    return register.run(register.RegisterConfig(
        selection=str(root / name / "select"), dataset=str(prepared / "dataset"), model_name="dog-gate",
        output=str(root / name / "register"), confirmation=str(root / name / "confirm"), **register_options))


def test_every_evaluation_keeps_per_image_scores_whose_means_are_the_scores(champion_run):
    metrics = json.loads((champion_run["root"] / "eval" / "step-2" / "metrics.json").read_text())
    for name in ("dino", "clip_i", "clip_t"):
        rows = metrics["per_image"][name]
        assert [len(r) for r in rows] == [2, 2]  # per prompt, per seed
        assert np.mean(rows) == pytest.approx(metrics[name])
    assert np.mean(metrics["per_class_image"]["preservation"]) == pytest.approx(metrics["preservation"])
    assert metrics["seeds"] == [[0, 1], [1000, 1001]]
    base = json.loads((champion_run["root"] / "eval" / "base" / "metrics.json").read_text())
    assert base["base"] and base["checkpoint"] is None and base["preservation"] == pytest.approx(1.0)
    assert base["suite"] == metrics["suite"] and -1 <= base["class_similarity"] <= 1


def test_the_confirmation_seeds_differ_from_the_selection_seeds(champion_run):
    from dreamline import plan

    chosen = json.loads((champion_run["root"] / "eval" / "step-2" / "metrics.json").read_text())
    confirmed = json.loads((champion_run["root"] / "confirm" / "challenger" / "metrics.json").read_text())
    assert not set(np.ravel(chosen["seeds"])) & set(np.ravel(confirmed["seeds"]))
    assert confirmed["suite"] != chosen["suite"]
    # and the DAG plans them so, for any seed and the largest prompt set and image count the form allows
    params = {"seed": 2**31 - 1, "confirmation_images_per_prompt": 64, "images_per_prompt": 64}
    selection = {params["seed"] + 1000 * j + k for j in range(100) for k in range(64)}
    for rotation in ("md5:a", "md5:b", "md5:c"):
        start = plan.confirmation_seed(params["seed"], rotation)
        confirmation = {start + 1000 * j + k for j in range(100) for k in range(64)}
        assert not selection & confirmation


def test_the_champions_own_weights_are_not_promoted(champion_run, prepared, models):
    """A challenger identical to the champion differs only by nothing: every paired difference is 0."""
    import shutil

    copy = shutil.copytree(champion_run["checkpoint"], champion_run["root"] / "same-weights-checkpoint")  # a new night
    result = challenge("same-weights", str(copy), prepared, models, champion_run["root"])
    assert not result["promoted"] and result["champion"] == 1 and result["aliases"] == ["challenger"]
    assert result["comparison"]["difference"] == 0 and result["comparison"]["low"] == 0
    assert "does not lie above the margin 0.1; v1 kept" in result["reason"]


def test_a_retrain_with_another_seed_is_not_promoted(champion_run, prepared, cache, models):
    other = train.run(train.TrainConfig(cache=cache, output=str(champion_run["root"] / "reseeded"), seed=7,
                                        base_model=models["sdxl"], learning_rate=1e-3, max_steps=2,
                                        checkpointing_steps=2, experiment="gate"))
    result = challenge("reseeded", other["checkpoints"][-1]["uri"], prepared, models, champion_run["root"])
    assert not result["promoted"] and result["champion"] == 1, result["reason"]
    assert result["comparison"]["low"] <= 0.1 and result["comparison"]["difference"] != 0


def test_a_first_version_equal_to_the_base_model_is_not_promoted(prepared, cache, models, tmp_path):
    # A learning rate so small that the LoRA stays at its initialisation, whose up-projections are zero: the base.
    trained = train.run(train.TrainConfig(cache=cache, output=str(tmp_path / "train"), base_model=models["sdxl"],
                                          learning_rate=1e-30, max_steps=2, checkpointing_steps=2, experiment="floor"))
    checkpoint = trained["checkpoints"][-1]["uri"]
    evaluate_all(tmp_path / "eval", {"step-2": checkpoint, "base": None}, prepared, models)
    select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "select")))
    evaluate_all(tmp_path / "confirm", {"challenger": checkpoint, "base": None}, prepared, models, seed=1_000_000)
    result = register.run(register.RegisterConfig(
        selection=str(tmp_path / "select"), dataset=str(prepared / "dataset"), model_name="dog-floor",
        output=str(tmp_path / "register"), confirmation=str(tmp_path / "confirm")))
    assert not result["promoted"] and result["champion"] is None and result["aliases"] == ["challenger"]
    assert result["reason"].startswith("first version: subject fidelity against the base model +0.000")
    assert result["reason"].endswith("does not lie above the margin 0.1")
    assert "champion" not in tracking.client().get_registered_model("dog-floor").aliases


# --- the statistics, on known per-image scores ---

def fake_evaluation(suite: str, dino, clip_i, clip_t, preservation=None, **fields) -> dict:
    """An evaluation's metrics.json with these per-image scores, 4 seeds per prompt."""
    rows = lambda values: np.reshape(values, (-1, 4)).tolist()  # noqa: E731
    evaluation = {"suite": suite, "per_image": {"dino": rows(dino), "clip_i": rows(clip_i), "clip_t": rows(clip_t)},
                  **fields}
    for name in ("dino", "clip_i", "clip_t"):
        evaluation[name] = float(np.mean(evaluation["per_image"][name]))
    if preservation is not None:
        evaluation["per_class_image"] = {"preservation": rows(preservation)}
        evaluation["preservation"] = float(np.mean(preservation))
    return evaluation


def test_normalisation_puts_metrics_of_different_scales_on_one_footing():
    rng = np.random.default_rng(0)
    base = fake_evaluation("s", rng.normal(0.3, 0.10, 16), rng.normal(0.6, 0.10, 16), rng.normal(0.30, 0.01, 16),
                           preservation=[1.0] * 4, class_similarity=0.6)
    yardstick = compare.Yardstick.from_base(base)
    # +0.1 of DINO and +0.01 of CLIP-T are each one spread of the base model: the same normalised gain
    better = yardstick.normalise({"dino": base["dino"] + 0.1, "clip_i": base["clip_i"], "clip_t": base["clip_t"] + 0.01,
                                  "preservation": 0.6})
    assert better["dino"] == pytest.approx(better["clip_t"], rel=0.05) and better["clip_i"] == pytest.approx(0)
    assert better["preservation"] == pytest.approx(-1.0)  # as different as another draw of the base model


def test_noise_is_promoted_at_most_at_the_confidence_levels_rate_and_a_clear_gain_always():
    rng = np.random.default_rng(1)
    base = fake_evaluation("s", *(rng.normal(0.5, 0.1, 24) for _ in range(3)))
    yardstick, weights = compare.Yardstick.from_base(base), {"accuracy": 1.0, "flexibility": 1.0}
    false, true = 0, 0
    for trial in range(200):
        # each image's difficulty is shared by both models (pairing removes it); each model adds its own noise
        difficulty = [rng.normal(0.5, 0.1, 24) for _ in range(3)]
        champion = fake_evaluation("s", *(d + rng.normal(0, 0.02, 24) for d in difficulty))
        same = fake_evaluation("s", *(d + rng.normal(0, 0.02, 24) for d in difficulty))
        better = fake_evaluation("s", *(d + 0.05 + rng.normal(0, 0.02, 24) for d in difficulty))
        false += compare.paired_difference(same, champion, yardstick, weights, 0.95, resamples=500, seed=trial)["low"] > 0
        true += compare.paired_difference(better, champion, yardstick, weights, 0.95, resamples=500, seed=trial)["low"] > 0.1
    assert false <= 200 * 0.05  # a two-sided 95% interval lies above 0 by chance about 2.5% of the time
    assert true == 200


def test_a_clearly_better_challenger_takes_the_champion_alias(tmp_path, home):
    """register on known confirmation scores: a real registry, a clear gain, the interval above the margin."""
    client = tracking.client()
    client.create_registered_model("dog-clear")
    first = client.create_model_version("dog-clear", source=str(tmp_path), run_id=None).version
    client.set_registered_model_alias("dog-clear", "champion", first)
    second = client.create_model_version("dog-clear", source=str(tmp_path), run_id=None).version
    rng = np.random.default_rng(2)
    difficulty = [rng.normal(0.5, 0.1, 16) for _ in range(3)]
    confirmation = [
        fake_evaluation("c", *difficulty, base=True),
        fake_evaluation("c", *(d + 0.01 for d in difficulty), champion_version=int(first)),
        fake_evaluation("c", *(d + 0.08 for d in difficulty), checkpoint="ckpt"),
    ]
    weights = {"accuracy": 1.0, "flexibility": 1.0, "preservation": 0.5}
    promote, reason, comparison, _ = register.decide(first, second, {"checkpoint": "ckpt"}, confirmation,
                                                  weights, 0.95, 0.1)
    assert promote and comparison["low"] > 0.1 and reason.startswith(f"score against champion v{first} +")
    # the same gain on another suite than the base model's is refused, not compared
    confirmation[2]["suite"] = "other"
    with pytest.raises(Exception, match="images can only be paired within one suite"):
        register.decide(first, second, {"checkpoint": "ckpt"}, confirmation, weights, 0.95, 0.1)


def test_select_ranks_on_normalised_scores_and_names_the_base_model(tmp_path):
    rng = np.random.default_rng(3)
    base = fake_evaluation("s", rng.normal(0.3, 0.1, 8), rng.normal(0.6, 0.1, 8), rng.normal(0.3, 0.01, 8),
                           base=True, prompts=PROMPTS)
    # +0.05 of DINO (half a spread) against +0.02 of CLIP-T (two spreads): normalised, prompt fidelity wins
    subject = fake_evaluation("s", [v + 0.05 for v in base["per_image"]["dino"][0]], base["per_image"]["clip_i"][0],
                              base["per_image"]["clip_t"][0], learning_rate=1e-4, step=100, checkpoint="a")
    prompt = fake_evaluation("s", base["per_image"]["dino"][0], base["per_image"]["clip_i"][0],
                             [v + 0.02 for v in base["per_image"]["clip_t"][0]], learning_rate=5e-4, step=100,
                             checkpoint="b")
    for name, metrics in (("base", base), ("a", subject), ("b", prompt)):
        with write_dir(str(tmp_path / "eval" / name)) as out:
            (out / "metrics.json").write_text(json.dumps(metrics))
    chosen = select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "s")))
    assert chosen["selected"]["checkpoint"] == "b"
    table = select.format_table(json.loads((tmp_path / "s" / "selection.json").read_text()))
    assert "base model" in table and "<- selected" in table
    (tmp_path / "eval" / "base" / "metrics.json").unlink()
    with pytest.raises(Exception, match="no evaluation of the base model"):
        select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "s2")))


def test_the_approval_page_shows_the_decision_and_the_grids_from_a_url_the_browser_loads(home, tmp_path):
    parent = tracking.find_or_create_run("review-page", "review/run-1", "run-1")
    row = {"learning_rate": 1e-4, "step": 100, "score": 0.8, "dino": 0.5, "clip_i": 0.6, "clip_t": 0.3,
           "preservation": 0.9, "norm": {"dino": 1.5, "clip_i": 0.5, "clip_t": 0.2, "preservation": -0.1}}
    selection = {"selected": row, "runners_up": [], "table": [row], "champion": None,
                 "base": {**row, "base": True, "score": 0.0, "learning_rate": None, "step": None},
                 "weights": {"accuracy": 1.0, "flexibility": 1.0, "preservation": 0.5}, "prompts": ["a", "b"]}
    comparison = {"difference": 0.9, "low": 0.4, "high": 1.3, "confidence": 0.95, "images": 8}
    result = {"version": 2, "aliases": ["challenger"], "promoted": False, "awaiting_approval": True,
              "reason": "score against champion v1 ...; waiting for a reviewer's approval", "comparison": comparison}
    from sd_tasks.registry.report import review

    page = review("dog-sdxl-lora", selection, result, parent, "http://mlflow.example:5000/")
    assert "**Waiting for a reviewer's approval**: score against champion v1" in page
    assert "| selected (lr 0.0001, step 100) | 0.5000 (+1.50) | 0.6000 (+0.50) |" in page  # raw (normalised)
    for j in (0, 1):
        assert (f"(http://mlflow.example:5000/get-artifact?path=review/grid-prompt-{j:02d}.png&run_uuid={parent})"
                in page)
    # no URL a browser can reach (a sqlite store): the page says where the grids are instead of linking nothing
    assert "`review/`" in review("dog-sdxl-lora", selection, result, parent, None)
    assert "get-artifact" not in review("dog-sdxl-lora", selection, result, parent, None)


def test_a_champion_served_on_another_base_model_is_not_replaced_automatically():
    """The operator moved the base model: the champion is served on its own (what its version records) but was
    re-scored on today's. However clear the gain, that pairing is never served, so a reviewer decides; on one base
    model the same gain promotes at once."""
    rng = np.random.default_rng(4)
    difficulty = [rng.normal(0.5, 0.1, 16) for _ in range(3)]
    confirmation = [
        fake_evaluation("c", *difficulty, base=True),
        fake_evaluation("c", *(d + 0.01 for d in difficulty), champion_version=1, trained_on="sdxl@aaa"),
        fake_evaluation("c", *(d + 0.08 for d in difficulty), checkpoint="ckpt", trained_on="sdxl-turbo@bbb"),
    ]
    weights = {"accuracy": 1.0, "flexibility": 1.0, "preservation": 0.5}
    decision = register.decide("1", "2", {"checkpoint": "ckpt"}, confirmation, weights, 0.95, 0.1)
    assert decision.eligible and decision.needs_review
    assert decision.reason.endswith("champion v1 is served on sdxl@aaa and was scored here on sdxl-turbo@bbb: a "
                                    "reviewer decides")
    confirmation[1]["trained_on"] = "sdxl-turbo@bbb"
    same_base = register.decide("1", "2", {"checkpoint": "ckpt"}, confirmation, weights, 0.95, 0.1)
    assert same_base.eligible and not same_base.needs_review


def test_a_confirmation_on_one_prompt_is_no_evidence():
    """One prompt's images share its luck: no interval can be drawn from them, however many seeds. Register still
    registers the version, unpromoted, and says why."""
    difficulty = [np.full(4, 0.5) for _ in range(3)]
    confirmation = [fake_evaluation("c", *difficulty, base=True),
                    fake_evaluation("c", *(d + 0.5 for d in difficulty), checkpoint="ckpt")]
    decision = register.decide(None, "1", {"checkpoint": "ckpt"}, confirmation, {"accuracy": 1.0}, 0.95, 0.1)
    assert not decision.eligible and "fewer than 2 prompts: no interval can be drawn" in decision.reason


def test_the_interval_resamples_prompts_with_their_seeds():
    """When a checkpoint's differences from the champion move together over a prompt's seeds (its luck with that
    prompt), the evidence is 12 prompts, not 48 independent images: the interval is about twice as wide as if each
    image were its own prompt, and says what it rests on."""
    rng = np.random.default_rng(5)
    base = fake_evaluation("c", *(rng.normal(0.5, 0.1, 48) for _ in range(3)), base=True)
    luck = [np.repeat(rng.normal(0, 0.05, 12), 4) for _ in range(3)]  # one value per prompt, shared by its 4 seeds
    champion = fake_evaluation("c", *(np.asarray(base["per_image"][m]).ravel() for m in ("dino", "clip_i", "clip_t")))
    challenger = fake_evaluation("c", *(np.asarray(champion["per_image"][m]).ravel() + d
                                        for m, d in zip(("dino", "clip_i", "clip_t"), luck)))
    yardstick, weights = compare.Yardstick.from_base(base), {"accuracy": 1.0, "flexibility": 1.0}
    clustered = compare.paired_difference(challenger, champion, yardstick, weights, 0.95)
    as_images = {name: {**e, "per_image": {m: np.reshape(v, (-1, 1)).tolist() for m, v in e["per_image"].items()}}
                 for name, e in (("challenger", challenger), ("champion", champion))}
    one_by_one = compare.paired_difference(as_images["challenger"], as_images["champion"], yardstick, weights, 0.95)
    assert clustered["difference"] == pytest.approx(one_by_one["difference"])
    assert clustered["high"] - clustered["low"] > 1.7 * (one_by_one["high"] - one_by_one["low"])
    assert clustered["rests_on"] == {"images": {"prompts": 12, "images": 48}}
    assert "on 12 prompts (48 images)" in compare.describe(clustered)


def test_a_checkpoint_whose_images_the_screen_flagged_is_not_promoted():
    """Flagged evaluation images (sd_tasks.safety.screening) above --max-flagged: registered, never promoted, and
    the reason says how many; the same clear gain without them is promoted."""
    rng = np.random.default_rng(3)
    difficulty = [rng.normal(0.5, 0.1, 16) for _ in range(3)]
    confirmation = [fake_evaluation("c", *difficulty, base=True),
                    fake_evaluation("c", *(d + 0.3 for d in difficulty), checkpoint="ckpt", screened=16, flagged=0)]
    clean = {"checkpoint": "ckpt", "screened": 8, "flagged": 0}
    assert register.decide(None, "1", clean, confirmation, {"accuracy": 1.0}, 0.95, 0.1).eligible
    selected = register.decide(None, "1", {**clean, "flagged": 1}, confirmation, {"accuracy": 1.0}, 0.95, 0.1)
    assert not selected.eligible and selected.reason.startswith("the screen flagged 1 of 8 of its evaluation images")
    assert register.decide(None, "1", {**clean, "flagged": 1}, confirmation, {"accuracy": 1.0}, 0.95, 0.1,
                           max_flagged=0.2).eligible  # one in eight is within a 20 % allowance
    confirmation[1]["flagged"] = 4
    confirmed = register.decide(None, "1", clean, confirmation, {"accuracy": 1.0}, 0.95, 0.1, max_flagged=0.2)
    assert not confirmed.eligible and "flagged 4 of 16 of its confirmation images" in confirmed.reason


def test_the_report_says_what_the_screen_flagged_and_of_how_many():
    from sd_tasks.registry.report import screened

    rows = [{"learning_rate": 1e-4, "step": 2, "flagged": 1, "screened": 4},
            {"learning_rate": 1e-4, "step": 4, "flagged": 0, "screened": 4}]
    selection = {"table": rows, "base": {"base": True, "flagged": 0, "screened": 4},
                 "champion": {"champion_version": 3, "flagged": 2, "screened": 4}}
    said = screened(selection)
    assert said.startswith("The screen flagged evaluation images (lr 0.0001 @2: 1 of 4; champion v3: 2 of 4)")
    rows[0]["flagged"] = selection["champion"]["flagged"] = 0
    assert screened(selection) == "The screen flagged none of the 16 evaluation images (docs/safety.md)."
