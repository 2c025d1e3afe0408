"""The night's cost: one record per try of every step, summed once each, across a crashed, resumed and retried
train; the totals on the registered version and the parent run come from the same ledger."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_tasks import cli
from sd_tasks.core import cost, tracking
from sd_tasks.training import train


def test_cost_adds_up_across_a_crashed_resumed_and_retried_train(prepared, cache, models, tmp_path, monkeypatch,
                                                                 capsys):
    ledger = tmp_path / "run" / "cost"
    argv = ["train", f"--cache={cache}", f"--output={tmp_path / 'run' / 'train'}", f"--base-model={models['sdxl']}",
            "--learning-rate=0.001", "--max-steps=4", "--checkpointing-steps=2", "--experiment=cost"]

    def attempt(try_number: int) -> int:
        monkeypatch.setenv(cost.RECORD_ENV, str(ledger / f"train.0.try-{try_number}.json"))
        return cli.main(list(argv))

    real = train.stop_if_not_finite

    def crash_at_step_3(loss, step):  # a preempted node, after checkpoint-2 was written
        if step == 3:
            raise RuntimeError("node preempted")
        real(loss, step)

    monkeypatch.setattr(train, "stop_if_not_finite", crash_at_step_3)
    assert attempt(1) == cli.EXIT_CRASHED
    monkeypatch.setattr(train, "stop_if_not_finite", real)
    assert attempt(2) == 0  # resumes from step 2
    assert attempt(3) == 0  # the task retried once more (its result was lost): already finished, trains nothing
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["resumed_from"] for r in results] == [2, 4]

    records = cost.ledger(str(ledger))
    assert sorted((r["task"], r["map_index"], r["try"], r["exit_code"]) for r in records) == [
        ("train", 0, 1, 1), ("train", 0, 2, 0), ("train", 0, 3, 0)]
    assert all(r["seconds"] > 0 and r["gpus"] == 0 and r["gpu_seconds"] == 0 for r in records)  # no GPU here
    summary = cost.summarise(records, gpu_hour_price=3.0)
    [row] = summary["steps"]
    assert (row["task"], row["step"], row["tasks"], row["tries"]) == ("train", "train", 1, 3)
    assert summary["total"]["seconds"] == pytest.approx(sum(r["seconds"] for r in records))
    # a try that writes its record again replaces it: nothing is counted twice
    assert attempt(3) == 0
    assert cost.summarise(cost.ledger(str(ledger)), 3.0)["total"]["tries"] == 3

    # the training run's own seconds: those of the steps in its weights, over the attempts, not the last one's
    client = tracking.client()
    logged = client.get_metric_history(results[-1]["run_id"], "train_seconds")[-1].value
    in_checkpoint = json.loads(Path(tmp_path / "run" / "train" / "checkpoint-4" / "dreamline.json").read_text())
    assert logged == pytest.approx(in_checkpoint["train_seconds"]) and 0 < logged < summary["total"]["seconds"]


def test_the_price_follows_gpu_seconds():
    records = [{"step": "train", "task": "train", "map_index": 0, "try": 1, "seconds": 3600.0, "gpus": 2,
                "gpu_seconds": 7200.0}, {"step": "train", "task": "rung_1.train", "map_index": 0, "try": 1,
                                         "seconds": 1800.0, "gpus": 1, "gpu_seconds": 1800.0},
               {"step": "select", "task": "select", "map_index": -1, "try": 1, "seconds": 10.0, "gpus": 0,
                "gpu_seconds": 0.0}]
    summary = cost.summarise(records, gpu_hour_price=2.0)
    assert summary["total"] == {"tries": 3, "seconds": 5410.0, "gpu_seconds": 9000.0, "price": 5.0, "images": 0}
    assert [(r["task"], r["tasks"], r["price"]) for r in summary["steps"]] == [
        ("train", 1, 4.0), ("rung_1.train", 1, 1.0), ("select", 1, 0.0)]
    assert "| **night** |  |  | 3 | 5410.0 | 9000.0 | 0 | 5.00 |" in cost.table(summary)


def test_a_night_counts_the_images_it_generated_and_weighs_evaluation_against_training(
        prepared, models, tmp_path, monkeypatch, capsys):
    """Every evaluate process records the images it generated (a kept evaluation, copied, none); the night's summary
    puts evaluation's seconds and images beside training's."""
    monkeypatch.setattr(cost, "_generated", {"images": 0, "denoising_steps": 0})
    record = tmp_path / "cost" / "evaluate.0.try-1.json"
    monkeypatch.setenv(cost.RECORD_ENV, str(record))
    argv = ["evaluate", f"--output={tmp_path / 'eval'}", f"--instance-images={prepared / 'resized'}",
            "--prompts=a sks dog", "--prompts=a red sks dog", "--class-prompts=a photo of dog",
            f"--base-model={models['sdxl']}", f"--clip-model={models['clip']}", f"--dino-model={models['dino']}",
            "--images-per-prompt=2", "--num-inference-steps=3"]
    assert cli.main(argv) == 0
    written = json.loads(record.read_text())
    assert (written["images"], written["denoising_steps"]) == (6, 18)  # 2 prompts and 1 class prompt, x2, x3 steps
    records = [*cost.ledger(str(tmp_path / "cost")), {"step": "train", "task": "train", "map_index": 0, "try": 1,
                                                       "seconds": 2 * written["seconds"], "gpu_seconds": 0.0}]
    summary = cost.summarise(records, 2.0)
    assert summary["total"]["images"] == 6 and summary["evaluation"]["images"] == 6
    assert cost.evaluation_against_training(summary) == (
        f"Evaluation: 6 images, {written['seconds']:.0f} seconds (no GPU) (0.50x training's "
        f"{2 * written['seconds']:.0f}).")
