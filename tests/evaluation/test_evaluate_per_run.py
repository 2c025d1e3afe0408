"""Evaluating a training run in one process (one pipeline, LoRA weights swapped in place) gives the scores that
evaluating each checkpoint in its own process gives, in the same folders and MLflow layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import shutil

from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError
from sd_tasks.evaluation import evaluate, evaluation_images, select
from sd_tasks.training import train

PROMPTS = ["a sks dog in the snow", "a red sks dog"]


@pytest.fixture(scope="module")
def run_folder(prepared, cache, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("per-run") / "train" / "lr-1e-3"
    train.run(train.TrainConfig(cache=cache, output=str(out), base_model=models["sdxl"], learning_rate=1e-3,
                                max_steps=4, checkpointing_steps=2, experiment="per-run", rank=8))
    return out


def suite(prepared, models, **extra) -> dict:
    return dict(instance_images=str(prepared / "resized"), prompts=PROMPTS, class_prompts=["a photo of dog"],
                clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2,
                **extra)


@pytest.fixture
def loads(monkeypatch) -> dict:
    """How many times each heavy thing was loaded in this process."""
    counts = {"pipeline": 0, "clip": 0, "dino": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(evaluation_images, "load_pipeline", counted("pipeline", evaluation_images.load_pipeline))
    monkeypatch.setattr(evaluate, "ClipEmbedder", counted("clip", evaluate.ClipEmbedder))
    monkeypatch.setattr(evaluate, "DinoEmbedder", counted("dino", evaluate.DinoEmbedder))
    return counts


def hotswaps(patch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each LoRA loaded into a pipeline from now on was hot-swapped into the adapter already there."""
    from diffusers import StableDiffusionXLPipeline

    swaps, real = [], StableDiffusionXLPipeline.load_lora_weights

    def recorded(self, *args, **kwargs):
        swaps.append(bool(kwargs.get("hotswap")))
        return real(self, *args, **kwargs)

    patch.setattr(StableDiffusionXLPipeline, "load_lora_weights", recorded)
    return swaps


def per_image(metrics: dict) -> list[float]:
    """Every per-image score of an evaluation's metrics.json (class images' too), in one flat list."""
    return [value for group in ("per_image", "per_class_image")
            for _, rows in sorted(metrics.get(group, {}).items()) for row in rows for value in row]


def test_one_process_per_training_run_gives_the_per_checkpoint_scores(run_folder, prepared, models, tmp_path,
                                                                      loads, monkeypatch):
    for step in (2, 4):
        evaluate.run(evaluate.EvaluateConfig(checkpoint=str(run_folder / f"checkpoint-{step}"),
                                             output=str(tmp_path / "single" / f"step-{step}"), **suite(prepared, models)))
    assert loads == {"pipeline": 2, "clip": 2, "dino": 2}  # the old way: everything loaded per checkpoint

    loads.update(pipeline=0, clip=0, dino=0)
    swaps = hotswaps(monkeypatch)
    result = evaluate.run(evaluate.EvaluateConfig(training_run=str(run_folder), output=str(tmp_path / "eval" / "lr-1e-3"),
                                                  **suite(prepared, models)))
    assert loads == {"pipeline": 1, "clip": 1, "dino": 1}
    assert swaps == [False, True]  # a UNet-only LoRA: the next checkpoint's weights hot-swapped into the adapter
    assert [e["step"] for e in result["evaluations"]] == [2, 4]
    single = [json.loads((tmp_path / "single" / f"step-{s}" / "metrics.json").read_text()) for s in (2, 4)]
    per_run = [json.loads((tmp_path / "eval" / "lr-1e-3" / f"step-{s}" / "metrics.json").read_text()) for s in (2, 4)]
    assert single[0]["dino"] != single[1]["dino"]  # the two checkpoints differ, so a stale LoRA would show
    for one, other in zip(single, per_run):
        assert one["suite"] == other["suite"] and one["checkpoint"] == other["checkpoint"]
        for metric in ("dino", "clip_i", "clip_t", "preservation"):
            assert other[metric] == pytest.approx(one[metric], abs=1e-5)
        assert per_image(other) == pytest.approx(per_image(one), abs=1e-5)
    # the same MLflow layout: each checkpoint's metrics once on its training run, at its step
    client = tracking.client()
    assert [m.step for m in client.get_metric_history(per_run[0]["run_id"], "eval/dino")] == [2, 4]

    loads.update(pipeline=0, clip=0, dino=0)  # again (a retry, or the next rung): whole evaluations are not redone
    again = evaluate.run(evaluate.EvaluateConfig(training_run=str(run_folder), output=str(tmp_path / "eval" / "lr-1e-3"),
                                                 **suite(prepared, models)))
    assert loads == {"pipeline": 0, "clip": 0, "dino": 0}
    assert [e.get("done") for e in again["evaluations"]] == [True, True]
    assert [e["dino"] for e in again["evaluations"]] == [e["dino"] for e in result["evaluations"]]

    # a per-run evaluation that stopped part-way: select names the checkpoint left without one
    evaluate.run(evaluate.EvaluateConfig(base_model=models["sdxl"], output=str(tmp_path / "eval" / "base"),
                                         **suite(prepared, models)))
    shutil.rmtree(tmp_path / "eval" / "lr-1e-3" / "step-4")
    chosen = select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "select"),
                                            expected=[str(tmp_path / "eval" / n) for n in ("lr-1e-3", "base")]))
    assert chosen["missing"] == ["lr-1e-3/step-4"] and chosen["selected"]["step"] == 2


def test_a_training_run_without_checkpoints_is_refused_in_one_line(tmp_path, prepared, models):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match=r"empty: no whole checkpoint to evaluate"):
        evaluate.run(evaluate.EvaluateConfig(training_run=str(tmp_path / "empty"), output=str(tmp_path / "out"),
                                             **suite(prepared, models)))


@pytest.fixture(scope="module")
def other_run(prepared, cache, models, tmp_path_factory) -> Path:
    """Another learning rate at another rank: a LoRA of another layout, which cannot be hot-swapped in."""
    out = tmp_path_factory.mktemp("per-run-other") / "train" / "lr-1e-4"
    train.run(train.TrainConfig(cache=cache, output=str(out), base_model=models["sdxl"], learning_rate=1e-4,
                                max_steps=2, checkpointing_steps=2, experiment="per-run", rank=4))
    return out


def test_a_sweep_the_champion_and_the_base_model_share_one_process(run_folder, other_run, prepared, models, tmp_path,
                                                                    loads, monkeypatch):
    """`evaluate --targets`, one task per GPU slot: every evaluation of the night that falls to it, one pipeline and
    one pair of evaluators, each written where its own process would have written it, with the same scores."""
    swaps = hotswaps(monkeypatch)
    targets = [f"lr-1e-3={run_folder}", f"lr-1e-4={other_run}", f"champion-v1={run_folder / 'checkpoint-2'}", "base="]
    result = evaluate.run(evaluate.EvaluateConfig(targets=targets, output=str(tmp_path / "eval"),
                                                  base_model=models["sdxl"], **suite(prepared, models)))
    assert loads == {"pipeline": 1, "clip": 1, "dino": 1}
    # rank 8 loaded, its next checkpoint hot-swapped; rank 4 (another layout) loaded afresh; the champion, rank 8
    # again after rank 4, afresh too
    assert swaps == [False, True, False, False]
    assert result["targets"] == ["lr-1e-3", "lr-1e-4", "champion-v1", "base"]
    metrics = {name: json.loads((tmp_path / "eval" / name / "metrics.json").read_text())
               for name in ("lr-1e-3/step-2", "lr-1e-3/step-4", "lr-1e-4/step-2", "champion-v1", "base")}
    assert metrics["base"]["base"] and metrics["lr-1e-4/step-2"]["learning_rate"] == 1e-4
    # the champion's weights are checkpoint-2's: no adapter of the LoRA before it stayed behind
    assert per_image(metrics["champion-v1"]) == pytest.approx(per_image(metrics["lr-1e-3/step-2"]), abs=1e-5)
    for name, alone in (("lr-1e-4/step-2", {"checkpoint": str(other_run / "checkpoint-2")}),
                        ("base", {"base_model": models["sdxl"]})):
        own = evaluate.run(evaluate.EvaluateConfig(output=str(tmp_path / "alone" / name), **alone,
                                                   **suite(prepared, models)))
        assert own["suite"] == metrics[name]["suite"]
        assert per_image(json.loads((tmp_path / "alone" / name / "metrics.json").read_text())) == \
            pytest.approx(per_image(metrics[name]), abs=1e-5)


@pytest.mark.parametrize("targets, says", [
    (["lr=a", "lr=b"], "a name given twice"), (["../up=x"], "NAME=SOURCE, NAME a folder name"),
    (["nothing"], "NAME=SOURCE"), (["base="], "need --base-model"),
])
def test_targets_that_cannot_be_evaluated_are_refused_in_one_line(tmp_path, prepared, models, targets, says):
    with pytest.raises(StepError, match=says):
        evaluate.run(evaluate.EvaluateConfig(targets=targets, output=str(tmp_path / "out"), **suite(prepared, models)))


def test_a_champion_that_cannot_be_evaluated_does_not_stop_the_night(run_folder, prepared, models, tmp_path):
    """The champion's LoRA file is refused (an old champion that does not fit today's base model): named `optional`,
    the other targets are still evaluated and the step succeeds, reporting it; not optional, the step refuses."""
    from sd_tasks.core.storage import write_dir

    broken = tmp_path / "champion"
    with write_dir(str(broken)) as out:
        shutil.copy(run_folder / "checkpoint-2" / train.CHECKPOINT_INFO, out)
        (out / train.LORA_WEIGHTS).write_bytes(b"not a safetensors file")
    targets = [f"challenger={run_folder / 'checkpoint-4'}", f"champion-v1={broken}", "base="]
    result = evaluate.run(evaluate.EvaluateConfig(targets=targets, optional=["champion-v1"],
                                                  output=str(tmp_path / "confirm"), **suite(prepared, models)))
    assert result["targets"] == ["challenger", "base"] and list(result["failed"]) == ["champion-v1"]
    assert result["failed"]["champion-v1"].startswith(str(broken))  # the refusal, naming the file
    assert sorted(p.name for p in (tmp_path / "confirm").iterdir()) == ["base", "challenger"]
    with pytest.raises(StepError):
        evaluate.run(evaluate.EvaluateConfig(targets=targets, output=str(tmp_path / "strict"),
                                             **suite(prepared, models)))
    with pytest.raises(StepError, match="--optional nobody: not among the --targets' names"):
        evaluate.run(evaluate.EvaluateConfig(targets=targets, optional=["nobody"], output=str(tmp_path / "x"),
                                             **suite(prepared, models)))


def test_evaluation_images_are_marked_and_those_the_screen_flags_are_counted(prepared, models, tmp_path):
    """Every generated image is marked (read back from the saved PNG); a screen's flags are counted in metrics.json
    with which image and why (a stand-in screen flags all: no explicit material needed)."""
    from PIL import Image

    from sd_tasks.safety.marking import is_marked
    from stand_in_screen import spec

    config = suite(prepared, models) | dict(images_per_prompt=1, resolution=256, class_prompts=[])
    evaluate.run(evaluate.EvaluateConfig(base_model=models["sdxl"], output=str(tmp_path / "flagged"),
                                         screen=spec("FlagAll"), **config))
    metrics = json.loads((tmp_path / "flagged" / "metrics.json").read_text())
    assert (metrics["screened"], metrics["flagged"]) == (2, 2)
    assert metrics["flagged_images"] == ["prompt 0 image 0: stand-in: every image (0.5)",
                                         "prompt 1 image 0: stand-in: every image (0.5)"]
    assert all(is_marked(Image.open(path)) for path in (tmp_path / "flagged" / "images").glob("p*.png"))
    clean = evaluate.run(evaluate.EvaluateConfig(base_model=models["sdxl"], output=str(tmp_path / "clean"), **config))
    assert (clean["screened"], clean["flagged"]) == (2, 0)  # the real detector: nothing in a tiny model's noise
