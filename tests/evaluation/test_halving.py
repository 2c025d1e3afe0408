"""Successive halving on the tiny model: every rate trains to the rung and is evaluated, the losers stop there, the
survivors resume from their rung checkpoint without training a step twice, and training seconds add up."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError
from sd_tasks.evaluation import evaluate, halving
from sd_tasks.training import train

RATES = (1e-3, 3e-3)


def evaluated(folder: Path, prepared, models, **where) -> dict:
    return evaluate.run(evaluate.EvaluateConfig(
        instance_images=str(prepared / "resized"), prompts=["a sks dog in the snow"], class_prompts=["a photo of dog"],
        clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2,
        base_model=models["sdxl"], **where))


@pytest.fixture(scope="module")
def rung(prepared, cache, models, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("halving")
    configs = {lr: train.TrainConfig(cache=cache, output=str(run / "train" / f"lr-{lr:g}"), base_model=models["sdxl"],
                                     learning_rate=lr, max_steps=4, checkpointing_steps=2, stop_at_step=2,
                                     experiment="halving") for lr in RATES}
    results = {lr: train.run(config) for lr, config in configs.items()}
    for lr in RATES:
        evaluated(run / "eval", prepared, models, training_run=str(run / "train" / f"lr-{lr:g}"),
                  output=str(run / "eval" / f"lr-{lr:g}"))
    evaluated(run / "eval", prepared, models, output=str(run / "eval" / "base"))
    decision = halving.run(halving.HalveConfig(evaluations=str(run / "eval"), output=str(run / "sweep"),
                                               learning_rates=list(RATES), rung=2, max_steps=4))
    return {"run": run, "configs": configs, "results": results, "decision": decision}


def test_the_losing_rate_stops_at_the_rung(rung):
    decision, results = rung["decision"], rung["results"]
    assert all(r["stopped_at"] == 2 and [c["step"] for c in r["checkpoints"]] == [2] for r in results.values())
    assert len(decision["kept"]) == 1 and len(decision["stopped"]) == 1
    written = json.loads((rung["run"] / "sweep" / "rung-2" / "halving.json").read_text())
    assert [r["learning_rate"] for r in written["ranked"]] == decision["kept"] + decision["stopped"]
    assert written["ranked"][0]["score"] >= written["ranked"][1]["score"]
    stopped = written["ranked"][1]
    seconds_to_rung = json.loads(Path(stopped["checkpoint"], "dreamline.json").read_text())["train_seconds"]
    assert stopped["saved_seconds"] == pytest.approx(seconds_to_rung)  # 2 more steps at the rung's speed
    assert stopped["saved_gpu_seconds"] == 0  # no GPU here
    assert "stopped lr " in halving.describe(halving.history(str(rung["run"] / "sweep")))


def test_the_survivor_resumes_without_repeating_a_step_and_its_seconds_add_up(rung, prepared, models, cache, tmp_path):
    lr = rung["decision"]["kept"][0]
    config = replace(rung["configs"][lr], stop_at_step=None)
    survived = train.run(config)
    assert survived["resumed_from"] == 2 and [c["step"] for c in survived["checkpoints"]] == [2, 4]
    client = tracking.client()
    assert [m.step for m in client.get_metric_history(survived["run_id"], "loss")] == [1, 2, 3, 4]  # each once
    # the weights an uninterrupted run of this rate ends with
    straight = train.run(replace(config, output=str(tmp_path / "straight"), experiment="halving-straight"))
    ours, theirs = (load_file(f"{r['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}") for r in (survived, straight))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    # training seconds: the rung's and the rest, once each; a retry of the finished run adds nothing and loses nothing
    first = rung["results"][lr]["train_seconds"]
    assert survived["train_seconds"] > first > 0
    retried = train.run(config)
    assert retried["resumed_from"] == 4 and retried["train_seconds"] == pytest.approx(survived["train_seconds"])
    logged = client.get_metric_history(survived["run_id"], "train_seconds")
    assert logged[-1].value == pytest.approx(survived["train_seconds"])
    # the next rung's evaluation scores only the new checkpoint
    again = evaluated(rung["run"] / "eval", prepared, models, training_run=config.output,
                      output=str(rung["run"] / "eval" / f"lr-{lr:g}"))
    assert [(e["step"], bool(e.get("done"))) for e in again["evaluations"]] == [(2, True), (4, False)]


def test_halving_refuses_a_rung_nobody_reached(rung):
    with pytest.raises(StepError, match="no evaluation at step 4"):
        halving.run(halving.HalveConfig(evaluations=str(rung["run"] / "eval"), output=str(rung["run"] / "x"),
                                        learning_rates=[RATES[0]], rung=4, max_steps=4))
