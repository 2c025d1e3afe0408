"""Batch generation: a prompt list x seeds rendered with one registered version, for a campaign or a review.

`generate` renders one prompt at every seed with a LoRA fetched by `champion` (one task per prompt, mapped, in the
`gpu` pool: the batch_images DAG), into a folder of PNGs and an `images.json` that says how to make each again;
`batch-report` gathers those folders into one MLflow run: a grid (a row per prompt, a column per seed), the images
and what made them. The images are made by the server's renderer, so a batch image and a served one with the same
version, prompt, seed and settings are the same image.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import read_dir, read_json, whole_jsons, write_dir, write_json
from sd_tasks.data.consent import tags_refusal
from sd_tasks.safety.marking import mark
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, SCREEN_HELP, screen_all
from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO, LORA_WEIGHTS

MANIFEST = "images.json"


@dataclass
class GenerateConfig:
    """Render one prompt at every seed with a registered LoRA (a folder as `champion` writes it)."""

    lora: str = option("URI of the LoRA folder `champion` wrote (its weights and checkpoint_info.json)")
    prompt: str = option("the prompt, literal ({instance} already filled in)")
    seeds: list[int] = option("one image per seed", at_least=0, at_most=2**31 - 1)
    output: str = option("URI to write the PNGs and images.json to")
    negative_prompt: str = option("negative prompt", "")
    steps: int = option("denoising steps", 25, at_least=1, at_most=200)
    guidance: float = option("classifier-free guidance scale", 5.0, at_least=0, at_most=30)
    size: int = option("width and height in pixels, a multiple of 8 (0: the base model's native size)", 0,
                       at_least=0, at_most=2048)
    dtype: str = option("inference dtype: auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16",
                        "auto")
    prompt_index: int = option("the prompt's place in the batch (its grid row)", 0, at_least=0)
    screen: str = option(f"{SCREEN_HELP}; a flagged image is withheld (not written; images.json says why)",
                         "nudenet")
    screen_threshold: float = option("detector score from which an image is flagged", DEFAULT_THRESHOLD, above=0,
                                     at_most=1)


def run(config: GenerateConfig) -> dict:
    from sd_tasks.models.loading import inference_dtype
    from sd_tasks.serving.champions import MODEL_SUFFIX, Served
    from sd_tasks.serving.renderer import Renderer, Request

    if config.size % 8:
        raise StepError(f"--size {config.size}: must be a multiple of 8 (SDXL's VAE works in 8-pixel cells)")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise StepError(f"--seeds {config.seeds}: give each seed once, at least one")
    lora = read_dir(config.lora, whole=True)
    info = read_json(str(lora / CHECKPOINT_INFO))
    if not (lora / LORA_WEIGHTS).is_file() or not info.get("champion_version") or "model_name" not in info:
        raise StepError(f"--lora {config.lora}: not a registered version's LoRA as `champion` writes it")
    model, version = info["model_name"], int(info["champion_version"])
    if reason := tags_refusal(info.get("consent") or {}, "serving", date.today()):  # a batch is images of them too
        raise StepError(f"--lora {config.lora}: {model} version {version}: {reason}; no image is made")
    served = Served(model.removesuffix(MODEL_SUFFIX), model, version, info.get("alias", ""), info["base_model"],
                    info.get("instance"), lora)
    renderer = Renderer(info["base_model"], inference_dtype(config.dtype), max_adapters=1, screen=config.screen,
                        screen_threshold=config.screen_threshold)
    size = config.size or renderer.native_size
    request = Request(config.prompt, config.negative_prompt, tuple(config.seeds), config.steps, config.guidance,
                      size, size)
    images = renderer.render(served, request)
    reasons = dict(zip(config.seeds, screen_all(renderer.screen, images)))
    with write_dir(config.output) as out:
        for seed, image in zip(config.seeds, images):
            if reasons[seed] is None:  # screened, then marked, as every image Dreamline lets out
                mark(image).save(out / f"seed-{seed}.png")
        write_json(out / MANIFEST, {
            "model": model, "version": version, "base_model": info["base_model"], "prompt": config.prompt,
            "prompt_index": config.prompt_index, "negative_prompt": config.negative_prompt, "seeds": config.seeds,
            "steps": config.steps, "guidance": config.guidance, "width": size, "height": size,
            "images": {str(seed): f"seed-{seed}.png" for seed in config.seeds if reasons[seed] is None},
            "withheld": {str(seed): reason for seed, reason in reasons.items() if reason}})
    withheld = sum(reason is not None for reason in reasons.values())
    return {"output": config.output, "images": len(images) - withheld, "withheld": withheld, "model": model,
            "version": version}


@dataclass
class BatchReportConfig:
    """Log a batch's images to one MLflow run: a grid of prompts x seeds, the images, what made them."""

    images: str = option("URI of the folder holding one `generate` output per prompt")
    experiment: str = option("MLflow experiment (the subject's)")
    run_name: str = option("MLflow run name")
    tags: list[str] = option("extra tags as key=value", [])


def report(config: BatchReportConfig) -> dict:
    import mlflow

    from sd_tasks.core import tracking
    from sd_tasks.evaluation.review import grid

    batches = sorted(whole_jsons(config.images, MANIFEST).items(), key=lambda kv: kv[1]["prompt_index"])
    if not batches:
        raise StepError(f"--images {config.images}: no whole `generate` output in it")
    versions = {(b["model"], b["version"]) for _, b in batches}
    if len(versions) != 1:
        raise StepError(f"--images {config.images}: images of several versions {sorted(versions)}; a batch is one")
    (model, version), first = versions.pop(), batches[0][1]
    rows = [f"{b['prompt_index'] + 1}. {b['prompt']}"[:60] for _, b in batches]
    columns = [f"seed {s}" for s in first["seeds"]]
    folders = [read_dir(where, whole=True) for where, _ in batches]  # fetched once (from S3: to a local cache)
    tiles = {(row, f"seed {seed}"): str(folder / file)
             for row, folder, (_, b) in zip(rows, folders, batches) for seed, file in b["images"].items()}
    picture = grid(tiles, f"{model} version {version}", rows, columns)
    tags = dict(tag.split("=", 1) for tag in config.tags)
    tracking.client()  # the tracking URI, as every step sets it
    with mlflow.start_run(experiment_id=tracking.experiment_id(config.experiment), run_name=config.run_name,
                          tags={"model": model, "version": str(version), "kind": "batch", **tags}) as run:
        mlflow.log_params({"steps": first["steps"], "guidance": first["guidance"], "size": first["width"],
                           "prompts": len(batches), "seeds": ",".join(map(str, first["seeds"]))})
        mlflow.log_image(picture, "grid.png")
        for folder, (_, batch) in zip(folders, batches):
            mlflow.log_artifacts(str(folder), f"images/prompt-{batch['prompt_index'] + 1}")
        withheld = sum(len(b.get("withheld", {})) for _, b in batches)
        mlflow.log_metric("withheld", withheld)  # images the screen flagged: grey tiles in the grid
    images = sum(len(b["images"]) for _, b in batches)
    return {"run_id": run.info.run_id, "images": images, "withheld": withheld, "prompts": len(batches),
            "model": model, "version": version}
