"""encode → train → evaluate → select → register on the tiny model, with MLflow on sqlite."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_tasks.core import storage, tracking
from sd_tasks.core.errors import StepError
from sd_tasks.data import encode
from sd_tasks.evaluation import evaluate, select
from sd_tasks.registry import register
from sd_tasks.training import train


def test_encode_cache_holds_latent_moments_text_embeddings_and_time_ids(cache):
    manifest = json.loads(Path(cache, "manifest.json").read_text())
    tensors = load_file(Path(cache, manifest["shards"][0], "latents.safetensors"))
    assert len(manifest["records"]) == 5 and manifest["scaling_factor"] == 0.13025
    key = manifest["records"][0]["key"]
    assert tensors[f"{key}.latent_moments"].shape == (8, 8, 8)  # mean and logvar of 4 channels at 64/8
    assert tensors[f"{key}.prompt_embeds"].shape == (77, 64)  # both encoders' penultimate states, 32 + 32
    assert tensors[f"{key}.pooled_prompt_embeds"].shape == (32,)
    assert manifest["records"][0]["original_size"] == [256, 256]


def test_encode_is_content_addressed_and_skips_a_rerun(prepared, models, cache):
    again = encode.run(encode.EncodeConfig(images=str(prepared / "resized"), output=str(prepared / "cache"),
                                           base_model=models["sdxl"]))
    assert again["cache"] == cache and again["cached"] and again["encoded"] == 0
    flipped = encode.run(encode.EncodeConfig(images=str(prepared / "resized"), output=str(prepared / "cache"),
                                             base_model=models["sdxl"], flip=True))
    assert flipped["cache"] != cache and not flipped["cached"]


def test_an_image_that_encodes_to_non_finite_values_is_refused_by_name(prepared, models, tmp_path, monkeypatch):
    real = encode.to_tensor

    def overflowing(image):  # what fp16 overflow inside a VAE produces, for one image
        pixels = real(image)
        return pixels * float("inf") if image.getpixel((0, 0)) == first_pixel else pixels

    manifest = json.loads((prepared / "resized" / "manifest.json").read_text())
    from PIL import Image

    first_pixel = Image.open(prepared / "resized" / manifest["records"][0]["file"]).convert("RGB").getpixel((0, 0))
    monkeypatch.setattr(encode, "to_tensor", overflowing)
    with pytest.raises(StepError, match=rf"^{manifest['records'][0]['source']}: encoding gave values that are not "
                                        r"finite \(in float32\)"):
        encode.run(encode.EncodeConfig(images=str(prepared / "resized"), output=str(tmp_path / "cache"),
                                       base_model=models["sdxl"]))
    assert not any((tmp_path / "cache").glob("*/manifest.json"))  # nothing half-written is taken for a cache


def test_three_shards_give_the_same_latents_as_one(prepared, models, cache, tmp_path):
    parts = [encode.run(encode.EncodeConfig(images=str(prepared / "resized"), output=str(tmp_path), shard_index=i,
                                            num_shards=3, base_model=models["sdxl"])) for i in range(3)]
    assert [p["encoded"] for p in parts] == [2, 2, 1] and len({p["cache"] for p in parts}) == 1
    assert encode.merge(encode.MergeConfig(cache=parts[0]["cache"], num_shards=3))["records"] == 5
    one, three = train.LatentCache(cache), train.LatentCache(parts[0]["cache"])
    assert len(one.items) == len(three.items) == 5
    for a, b in zip(one.items, three.items):
        for name in a:  # batching differently moves float32 results by ~1e-7, no more
            assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.fixture(scope="module")
def trained(prepared, cache, models, home):
    parent = tracking.run(tracking.StartRunConfig(experiment="dog", run_key="test/run-1"))["run_id"]
    config = train.TrainConfig(cache=cache, output=str(prepared / "train" / "lr-1e-3"),
                               base_model=models["sdxl"], learning_rate=1e-3, max_steps=4, checkpointing_steps=2,
                               experiment="dog", parent_run_id=parent)
    return {"parent": parent, "config": config, "result": train.run(config)}


def test_train_writes_checkpoints_and_a_nested_mlflow_run(trained):
    result, parent = trained["result"], trained["parent"]
    assert [c["step"] for c in result["checkpoints"]] == [2, 4]
    weights = load_file(f"{result['checkpoints'][-1]['uri']}/pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    files = list(Path(result["checkpoints"][-1]["uri"]).iterdir())  # readable by the MLflow server's user too
    assert len(files) == 6 and {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}  # state: 2 files
    client = tracking.client()
    run = client.get_run(result["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001"
    assert run.data.params["mixed_precision"] == "no"  # `auto` on the CPU: fp32, as the demo's numbers expect
    assert [m.step for m in client.get_metric_history(result["run_id"], "loss")] == [1, 2, 3, 4]
    metrics = run.data.metrics
    assert metrics["images_per_second"] > 0 and metrics["peak_rss_gb"] > 0
    assert metrics["gpu_seconds"] == metrics["estimated_cost"] == 0  # on a CPU


def test_training_is_deterministic_for_a_seed(trained, tmp_path):
    from dataclasses import replace

    again = train.run(replace(trained["config"], output=str(tmp_path / "again"), parent_run_id=None))
    first = load_file(f"{trained['result']['checkpoints'][-1]['uri']}/pytorch_lora_weights.safetensors")
    second = load_file(f"{again['checkpoints'][-1]['uri']}/pytorch_lora_weights.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lora_changes_the_images_of_the_base_model(trained, models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])

    def image():
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    pipe.load_lora_weights(trained["result"]["checkpoints"][-1]["uri"])
    assert abs(image() - base).max() > 1e-4


def test_bf16_keeps_the_frozen_unet_in_half_precision_and_trains_the_lora_in_fp32(cache, models, tmp_path):
    from sd_tasks.models.loading import load_unet

    config = train.TrainConfig(cache=cache, output=str(tmp_path / "bf16"), base_model=models["sdxl"],
                               learning_rate=1e-3, max_steps=2, checkpointing_steps=2, mixed_precision="bf16",
                               experiment="dog-bf16")
    unet = load_unet(models["sdxl"])
    train.add_lora(unet, config)
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}  # half the memory
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}  # AdamW's updates stay exact

    result = train.run(config)  # autocast on the CPU, fused AdamW on fp32 LoRA weights
    weights = load_file(f"{result['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert all(torch.isfinite(w).all() for w in weights.values())
    loss = [m.value for m in tracking.client().get_metric_history(result["run_id"], "loss")]
    assert len(loss) == 2 and all(0 < v < 10 for v in loss)


def test_evaluation_in_half_precision_with_another_vae_is_its_own_suite(trained, prepared, models, tmp_path):
    """The production pipeline recipe (the GPU's float16 path, checked here in bfloat16, which the CPU runs): the
    images are finite, the dtype that ran and the VAE are part of the suite, so their scores never mix with
    float32 ones."""
    checkpoint = str(tmp_path / "checkpoint")  # a copy that names no training run: nothing is logged to it
    with storage.write_dir(checkpoint) as out:
        source = Path(trained["result"]["checkpoints"][-1]["uri"])
        (out / train.LORA_WEIGHTS).write_bytes((source / train.LORA_WEIGHTS).read_bytes())
        info = json.loads((source / train.CHECKPOINT_INFO).read_text())
        (out / train.CHECKPOINT_INFO).write_text(json.dumps({**info, "run_id": None}))
    common = dict(checkpoint=checkpoint, instance_images=str(prepared / "resized"), prompts=["a red sks dog"],
                  clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=1, num_inference_steps=2)
    full = evaluate.run(evaluate.EvaluateConfig(output=str(tmp_path / "fp32"), **common))
    half = evaluate.run(evaluate.EvaluateConfig(output=str(tmp_path / "bf16"), dtype="bfloat16",
                                                vae=f"{models['sdxl']}/vae", **common))
    assert not half["broken"] and all(-1 <= half[k] <= 1 for k in ("clip_t", "clip_i", "dino"))
    assert half["suite"] != full["suite"]
    # `auto` is float32 on the CPU: the same suite as asking for float32
    assert evaluate.run(evaluate.EvaluateConfig(output=str(tmp_path / "auto"), dtype="auto", **common))["suite"] == \
        full["suite"]


def test_a_diverging_loss_stops_training_and_fails_the_run(prepared, cache, models, monkeypatch):
    monkeypatch.setattr(train.F, "mse_loss", lambda a, b, **kw: (a - b).pow(2) * float("nan"))
    config = train.TrainConfig(cache=cache, output=str(prepared / "train" / "nan"),
                               base_model=models["sdxl"], learning_rate=1e-3, max_steps=3, experiment="dog-nan")
    with pytest.raises(StepError, match="loss is nan at step 1"):
        train.run(config)
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id("dog-nan")])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["dreamline.error"].startswith("loss is nan at step 1: training diverged")


def test_evaluate_select_register(trained, prepared, models):
    for checkpoint in trained["result"]["checkpoints"]:
        scores = evaluate.run(evaluate.EvaluateConfig(
            checkpoint=checkpoint["uri"], output=str(prepared / "eval" / f"step-{checkpoint['step']}"),
            instance_images=str(prepared / "resized"), prompts=["a sks dog in the snow", "a red sks dog"],
            clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2))
        assert all(-1 <= scores[k] <= 1 for k in ("clip_t", "clip_i", "dino"))
        assert len(list((prepared / "eval" / f"step-{checkpoint['step']}" / "images").iterdir())) == 4
    evaluate.run(evaluate.EvaluateConfig(  # the base model alone: the yardstick of normalised scores
        checkpoint=None, base_model=models["sdxl"], output=str(prepared / "eval" / "base"),
        instance_images=str(prepared / "resized"), prompts=["a sks dog in the snow", "a red sks dog"],
        clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2))
    client = tracking.client()
    run_id = trained["result"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/dino")] == [2, 4]

    chosen = select.run(select.SelectConfig(evaluations=str(prepared / "eval"), output=str(prepared / "select"),
                                            parent_run_id=trained["parent"]))
    assert chosen["candidates"] == 2
    # every evaluated checkpoint is an MLflow LoggedModel of its training run, ranked by select's score
    import mlflow

    ranked = mlflow.search_logged_models(experiment_ids=[tracking.experiment_id("dog")], output_format="list",
                                         order_by=[{"field_name": "metrics.eval/score", "ascending": False}])
    assert {m.source_run_id for m in ranked} == {run_id} and len(ranked) == 2
    assert {m.name for m in ranked[:1]} == {f"lr-0_001-step-{chosen['selected']['step']}"}
    for checkpoint in (chosen["selected"]["checkpoint"], None):  # the confirmation suite: new seeds
        evaluate.run(evaluate.EvaluateConfig(
            checkpoint=checkpoint, base_model=models["sdxl"], seed=1_000_000,
            output=str(prepared / "confirm" / ("challenger" if checkpoint else "base")),
            instance_images=str(prepared / "resized"), prompts=["a sks dog in the snow", "a red sks dog"],
            clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2))

    config = register.RegisterConfig(selection=str(prepared / "select"), dataset=str(prepared / "dataset"),
                                     model_name="dog-sdxl-lora", output=str(prepared / "register"),
                                     parent_run_id=trained["parent"], confirmation=str(prepared / "confirm"),
                                     margin=-10)  # tiny random evaluators cannot see a subject: no floor here
    first = register.run(config)
    assert first["version"] == 1 and first["aliases"] == ["challenger", "champion"] and first["promoted"]
    version = client.get_model_version("dog-sdxl-lora", "1")
    dataset = json.loads((prepared / "dataset" / "dataset.json").read_text())
    assert version.tags["dataset.rev"] == "dog-v1" and version.tags["dataset.hash"] == dataset["hash"]
    assert version.tags["dataset.commit"] == dataset["commit"] and version.tags["base_model"] == models["sdxl"]
    assert version.tags["step"] == str(chosen["selected"]["step"]) and version.tags["learning_rate"] == "0.001"
    assert client.get_run(trained["parent"]).info.status == "FINISHED"
    assert register.run(config)["version"] == 1  # a retried register makes no second version
    assert len(client.search_model_versions("name = 'dog-sdxl-lora'")) == 1


def test_select_weights_and_ties_go_to_the_earlier_step(tmp_path):
    rows = [(1e-4, 100, 0.5, 0.5, 0.2), (1e-4, 200, 0.5, 0.5, 0.2), (5e-4, 100, 0.9, 0.9, 0.1)]
    for lr, step, dino, clip_i, clip_t in rows:
        with storage.write_dir(str(tmp_path / "eval" / f"{lr}-{step}")) as folder:  # as evaluate writes them
            folder.joinpath("metrics.json").write_text(json.dumps(dict(
                learning_rate=lr, step=step, dino=dino, clip_i=clip_i, clip_t=clip_t, checkpoint=f"c{step}",
                run_id=None)))
    with storage.write_dir(str(tmp_path / "eval" / "base")) as folder:  # centre 0, spread 1: normalised = raw
        folder.joinpath("metrics.json").write_text(json.dumps(dict(
            base=True, checkpoint=None, learning_rate=None, step=None, dino=0.0, clip_i=0.0, clip_t=0.0,
            per_image={m: [[-1.0, 1.0]] for m in ("dino", "clip_i", "clip_t")}, prompts=["p"])))
    (tmp_path / "eval" / "killed").mkdir()  # an evaluation whose writer died: no marker, not a candidate
    (tmp_path / "eval" / "killed" / "metrics.json").write_text(json.dumps(dict(
        learning_rate=1e-3, step=100, dino=1.0, clip_i=1.0, clip_t=1.0, checkpoint="c", run_id="r")))

    def best(**weights):
        out = select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "s"), **weights))
        return out["selected"]["learning_rate"], out["selected"]["step"]

    assert best() == (5e-4, 100)
    assert best(weight_accuracy=0.0) == (1e-4, 100)  # prompt fidelity only: tie between steps 100 and 200

    # The evaluations the DAG planned: one never ran, one was killed; select works from the rest and names them.
    planned = [str(tmp_path / "eval" / n) for n in ("0.0001-100", "0.0005-100", "killed", "0.001-200")]
    out = select.run(select.SelectConfig(evaluations=str(tmp_path / "eval"), output=str(tmp_path / "s"),
                                         expected=planned))
    assert out["missing"] == ["killed", "0.001-200"] and out["selected"]["learning_rate"] == 5e-4
    assert json.loads((tmp_path / "s" / "selection.json").read_text())["missing"] == ["killed", "0.001-200"]


def test_metric_math_on_known_embeddings():
    from sd_tasks.evaluation.metrics import matched_cosines, mean_cosines

    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert mean_cosines(a[:1], a[:1]) == pytest.approx([1.0])
    assert mean_cosines(a, a)[0] == pytest.approx((a[0] @ a.T).mean().item())  # one image against all
    assert matched_cosines(a, a) == pytest.approx([1.0] * 4)
    assert all(c < 1.0 for c in matched_cosines(a, a[[1, 2, 3, 0]]))


def test_prior_preservation_trains_on_cached_class_images(prepared, cache, models, tmp_path):
    from dataclasses import replace

    from sd_tasks.data import class_images

    config = class_images.ClassImagesConfig(base_model=models["sdxl"], class_prompt="a photo of dog",
                                            output=str(tmp_path / "class"), count=3, resolution=64,
                                            num_inference_steps=2)
    made = class_images.run(config)
    assert not made["cached"] and len(list(Path(made["images"], "images").iterdir())) == 3
    assert class_images.run(config)["cached"]  # same model, prompt, count, seed, resolution: generated once
    assert class_images.run(replace(config, dtype="float32"))["cached"]  # `auto` is float32 on the CPU
    half = class_images.run(replace(config, dtype="bfloat16", count=1))
    assert not half["cached"] and half["key"] != made["key"]  # another dtype draws other images: its own entry
    class_cache = encode.run(encode.EncodeConfig(images=made["images"], output=str(tmp_path / "cache"),
                                                 base_model=models["sdxl"]))["cache"]
    common = dict(cache=cache, base_model=models["sdxl"], max_steps=2, checkpointing_steps=2, experiment="prior")
    with_prior = train.run(train.TrainConfig(output=str(tmp_path / "with"), class_cache=class_cache, **common))
    without = train.run(train.TrainConfig(output=str(tmp_path / "without"), **common))
    a = load_file(f"{with_prior['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}")
    b = load_file(f"{without['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the class images' loss moved the weights


def test_an_evaluation_is_kept_by_lora_weights_and_suite(trained, prepared, models, tmp_path):
    import shutil

    checkpoint = trained["result"]["checkpoints"][-1]["uri"]
    elsewhere = shutil.copytree(prepared / "resized", tmp_path / "resized-copy")  # the same images, another folder

    def evaluated(name: str, instance_images, prompt: str) -> dict:
        return evaluate.run(evaluate.EvaluateConfig(
            checkpoint=checkpoint, output=str(tmp_path / name), instance_images=str(instance_images), prompts=[prompt],
            clip_model=models["clip"], dino_model=models["dino"], images_per_prompt=1, num_inference_steps=2,
            cache=str(tmp_path / "kept")))

    first = evaluated("first", prepared / "resized", "a sks dog in the snow")
    logged = len(tracking.client().get_metric_history(first["run_id"], "eval/dino"))
    again = evaluated("again", elsewhere, "a sks dog in the snow")  # say, tomorrow's run defending the champion
    assert "cached" not in first and again["cached"] and again["suite"] == first["suite"]
    # a checkpoint with a training run gets the kept scores logged there (here its own run: once, not twice)
    assert len(tracking.client().get_metric_history(first["run_id"], "eval/dino")) == logged  # not twice
    assert {k: again[k] for k in ("dino", "clip_i", "clip_t", "step")} == {k: first[k] for k in ("dino", "clip_i",
                                                                                                 "clip_t", "step")}
    assert sorted(p.name for p in (tmp_path / "again" / "images").iterdir()) == ["p00-0.png"]
    other = evaluated("other", elsewhere, "a red sks dog")  # another suite: evaluated afresh
    assert "cached" not in other and other["suite"] != first["suite"]


def test_a_diverged_model_is_registered_as_challenger_and_not_promoted(trained, prepared, cache, models, tmp_path):
    suite = dict(instance_images=str(prepared / "resized"), prompts=["a sks dog in the snow", "a red sks dog"],
                 class_prompts=["a photo of dog"], clip_model=models["clip"], dino_model=models["dino"],
                 images_per_prompt=1, num_inference_steps=2)

    def evaluate_select_register(checkpoints: list[str], name: str, parent: str) -> dict:
        for i, checkpoint in enumerate([*checkpoints, None]):  # and the base model
            evaluate.run(evaluate.EvaluateConfig(checkpoint=checkpoint, output=str(tmp_path / name / "eval" / str(i)),
                                                 base_model=models["sdxl"], **suite))
        chosen = select.run(select.SelectConfig(evaluations=str(tmp_path / name / "eval"),
                                                output=str(tmp_path / name / "s")))["selected"]["checkpoint"]
        for i, checkpoint in enumerate([chosen, *checkpoints[1:], None]):  # the confirmation suite
            evaluate.run(evaluate.EvaluateConfig(checkpoint=checkpoint, output=str(tmp_path / name / "c" / str(i)),
                                                 base_model=models["sdxl"], **{**suite, "seed": 1_000_000}))
        return register.run(register.RegisterConfig(
            selection=str(tmp_path / name / "s"), dataset=str(prepared / "dataset"), model_name="dog-guarded",
            output=str(tmp_path / name / "r"), parent_run_id=parent, confirmation=str(tmp_path / name / "c"),
            margin=-10))

    good = evaluate_select_register([c["uri"] for c in trained["result"]["checkpoints"]], "good",
                                    tracking.run(tracking.StartRunConfig(experiment="dog", run_key="good"))["run_id"])
    assert good["promoted"] and good["champion"] == good["version"]

    # A learning rate so high that the loss turns NaN at step 3. The checkpoint of step 2 exists and already draws
    # non-finite images. (Step 1's still draws finite noise, which tiny random evaluators cannot tell from a dog.)
    diverging = train.TrainConfig(cache=cache, output=str(tmp_path / "diverged"), base_model=models["sdxl"],
                                  learning_rate=1000.0, max_steps=4, checkpointing_steps=1, max_grad_norm=1e9,
                                  experiment="dog-diverged")
    with pytest.raises(StepError, match="loss is nan"):
        train.run(diverging)
    checkpoints = [c["uri"] for c in train.list_checkpoints(diverging.output)][-1:]
    champion = register.champion(register.ChampionConfig(model_name="dog-guarded", output=str(tmp_path / "champ")))
    assert champion["version"] == good["version"]
    bad = evaluate_select_register([*checkpoints, champion["checkpoint"]], "bad",
                                   tracking.run(tracking.StartRunConfig(experiment="dog", run_key="bad"))["run_id"])
    assert bad["version"] == good["version"] + 1
    assert bad["aliases"] == ["challenger"] and not bad["promoted"] and bad["champion"] == good["version"], bad
    assert "not finite" in bad["reason"]
    from sd_tasks.registry.promotion import RollbackConfig, rollback  # nor can a person make it champion by hand

    with pytest.raises(StepError, match="its images were not finite \\(a diverged LoRA\\); it cannot be champion"):
        rollback(RollbackConfig(model_name="dog-guarded", version=bad["version"], reason="try it", by="alice"))
    client = tracking.client()
    assert str(client.get_model_version_by_alias("dog-guarded", "champion").version) == str(good["version"])


def test_identical_images_score_one_with_the_real_embedders(models):
    from PIL import Image

    from sd_tasks.evaluation.metrics import ClipEmbedder, DinoEmbedder, matched_cosines, mean_cosines

    images = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (64, 64), (40, 200, 40))]
    clip, dino = ClipEmbedder(models["clip"]), DinoEmbedder(models["dino"])
    assert matched_cosines(clip.images(images), clip.images(images)) == pytest.approx([1.0] * len(images), abs=1e-5)
    assert matched_cosines(dino.images(images), dino.images(images)) == pytest.approx([1.0] * len(images), abs=1e-5)
    assert mean_cosines(clip.images(images[:1]), clip.images(images[1:]))[0] < 1.0
