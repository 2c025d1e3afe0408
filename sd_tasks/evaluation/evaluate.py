"""Evaluate LoRA checkpoints: generate fixed-seed images for a prompt set and score them.

One checkpoint (`--checkpoint`), the base model alone (neither), or every checkpoint of a training run
(`--training-run`): then the pipeline, both evaluators, the real images' embeddings and the base model's class images
are loaded or made once, and each checkpoint's LoRA weights are swapped into the loaded pipeline in place (diffusers'
LoRA hot-swap; a LoRA on the text encoders too is unloaded and loaded instead, which diffusers cannot hot-swap), so a
sweep costs one evaluation process per learning rate, not one per checkpoint. Each checkpoint
is still written to its own folder (`<output>/step-<N>`), logged to MLflow and kept exactly as a single evaluation
is; one already whole in its folder (an earlier rung of successive halving, or an earlier try) is not redone.

Scores (the DreamBooth paper's, plus one for what the user fears losing):
- dino, clip_i: subject fidelity, generated vs the real instance images (mean pairwise cosine);
- clip_t: prompt fidelity, each image vs its prompt without the identifier (`--identifier`: "a sks dog in the jungle"
  is scored against "a dog in the jungle", as the DreamBooth and Custom Diffusion evaluations do; the rare token means
  nothing to CLIP, or something else: "sks" is a rifle);
- preservation: the base model kept: images for the class prompt with the LoRA vs without it, same seeds
  (mean matched DINO cosine; 1 means the class looks exactly as before).

Every score is also kept per image (per prompt and seed), so two evaluations on one suite can be compared image by
image (sd_tasks.evaluation.compare). Without `--checkpoint` the base model alone is evaluated: the yardstick that scores are
normalised by, so that metrics moving by hundredths and by tenths weigh what the user's weights say.

The seeds depend only on the prompt and image index, so every checkpoint of every learning rate (and the base
model, and the champion being defended) is judged on the same starting noise. The suite, everything that decides
the images and the scores (the instance images by content, not by where they lie), has a fingerprint: scores compare
only within one suite. A checkpoint whose images come out non-finite (a diverged LoRA) is marked broken and gets the
lowest possible scores. Generated images are marked (sd_tasks.safety.marking) and screened: `flagged` counts those the
screen flags, `flagged_images` says which and why, and `register` does not promote a checkpoint with too many. With
`--cache`, an evaluation is kept by (LoRA weights, suite): the champion, defended every night on an unchanged suite,
is evaluated once, not every night.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import is_whole, join, read_dir, read_json, write_dir, write_json
from sd_tasks.data.dataset import content_hash
from sd_tasks.data.encode import model_fingerprint
from sd_tasks.data.manifest import inside, load
from sd_tasks.evaluation.compare import METRICS
from sd_tasks.evaluation.evaluation_images import Generator, prompt_seeds
from sd_tasks.evaluation.evaluation_log import log_to_training_run
from sd_tasks.evaluation.metrics import ClipEmbedder, DinoEmbedder, matched_cosines, mean_cosines
from sd_tasks.models.loading import inference_dtype
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, SCREEN_HELP, Screen, load_screen, screen_all
from sd_tasks.training import lora_files
from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO, LORA_WEIGHTS
from sd_tasks.training.train import list_checkpoints

IMAGE_METRICS = ("dino", "clip_i", "clip_t")  # per generated image; preservation is per class image
BASE_INFO = {"step": None, "learning_rate": None, "run_id": None, "champion_version": None, "base_model": None}
SUITE_FIELDS = ("prompts", "class_prompts", "clip_t_texts", "seeds", "class_seeds")  # written beside a result, not part of it
# raise when a change here or in sd_tasks.evaluation.metrics changes scores or images: kept evaluations expire
SCORING_VERSION = 4  # 4: generated images are marked


@dataclass
class EvaluateConfig:
    """Generate images with a LoRA checkpoint for fixed prompts and seeds; score DINO, CLIP-I, CLIP-T and
    preservation."""

    output: str = option("URI to write images/ and metrics.json to")
    instance_images: str = option("resize's output: the real subject images to compare with (URI)")
    prompts: list[str] = option("evaluation prompts, literal")
    identifier: str | None = option("the subject's identifier token (e.g. sks): CLIP-T scores each image against its "
                                    "prompt without it", None)
    checkpoint: str | None = option("a checkpoint-<step> folder written by train (URI); omitted: the base model "
                                    "alone (needs --base-model), the yardstick scores are normalised by", None)
    training_run: str | None = option("instead of --checkpoint: train's output folder (URI); every whole checkpoint "
                                      "in it is evaluated into <output>/step-<N>, loading the pipeline once", None)
    targets: list[str] = option("instead of both: several evaluations in this one process, NAME=SOURCE each, into "
                                "<output>/NAME; SOURCE a training run folder (each checkpoint into NAME/step-<N>), a "
                                "checkpoint folder, or empty for the base model (URIs)", [])
    optional: list[str] = option("NAMEs of --targets whose LoRA file is refused without failing the step (the "
                                 "champion: a night still registers its challenger, which is then not compared)", [])
    class_prompts: list[str] = option("prompts without the subject, for preservation (e.g. 'a photo of dog')", [])
    clip_model: str = option("CLIP model id or folder", "openai/clip-vit-large-patch14")
    dino_model: str = option("DINO ViT model id or folder", "facebook/dino-vits16")
    base_model: str | None = option("SDXL pipeline (default: the one the checkpoint was trained on)", None)
    refiner_model: str | None = option("SDXL refiner to pass every image through (e.g. ...-refiner-1.0)", None)
    scheduler: str | None = option("diffusers scheduler class, e.g. DPMSolverMultistepScheduler", None)
    images_per_prompt: int = option("images per prompt", 2, at_least=1, at_most=64)
    num_inference_steps: int = option("denoising steps", 25, at_least=1, at_most=200)
    guidance_scale: float = option("classifier-free guidance scale", 5.0, at_least=0, at_most=50)
    resolution: int | None = option("image side (default: the UNet's native size)", None, at_least=64, at_most=2048)
    dtype: str = option("pipeline dtype: auto (float16 on a CUDA GPU, float32 on the CPU), float16, bfloat16, "
                        "float32", "auto")
    vae: str | None = option("VAE to decode with instead of the base model's (e.g. madebyollin/sdxl-vae-fp16-fix)",
                             None)
    seed: int = option("base seed; image k of prompt j uses seed + 1000 * j + k", 0, at_least=0, at_most=2**62)
    cache: str | None = option("URI keeping evaluations by (LoRA weights, suite): one already done is copied", None)
    screen: str = option(f"{SCREEN_HELP}; flagged images are counted (register refuses to promote above its "
                         "--max-flagged)", "nudenet")
    screen_threshold: float = option("detector score from which an image is flagged", DEFAULT_THRESHOLD, above=0,
                                     at_most=1)


def run(config: EvaluateConfig) -> dict:
    config = replace(config, dtype=inference_dtype(config.dtype))  # the suite names the dtype that ran
    if config.targets:
        return evaluate_targets(config)
    if config.training_run:
        return evaluate_training_run(config)
    if config.checkpoint is None and not config.base_model:
        raise StepError("--checkpoint or --base-model: evaluating the base model alone needs --base-model")
    info = read_json(f"{config.checkpoint}/{CHECKPOINT_INFO}") if config.checkpoint else BASE_INFO
    base_model = config.base_model or info["base_model"]
    if config.checkpoint:  # before anything is loaded
        lora_files.check_checkpoints([config.checkpoint], base_model)
    return evaluate(config, Evaluator(config, base_model), info)


def evaluate_targets(config: EvaluateConfig) -> dict:
    """Several evaluations in one process, sharing one pipeline, one pair of evaluators and the base model's class
    images: the training runs of a sweep, the champion and the base model, as many as share one GPU. Every LoRA
    file is checked before anything loads; each target is written and kept as its own evaluation would be."""
    if config.checkpoint or config.training_run:
        raise StepError("--targets with --checkpoint or --training-run: give one of them")
    targets = [parse_target(target) for target in config.targets]
    if len({name for name, _ in targets}) < len(targets):
        raise StepError(f"--targets {' '.join(config.targets)}: a name given twice")
    if unknown := set(config.optional) - {name for name, _ in targets}:
        raise StepError(f"--optional {' '.join(sorted(unknown))}: not among the --targets' names")
    runs = {name: list_checkpoints(source) for name, source in targets if source and not is_whole(source)}
    if empty := [source for name, source in targets if name in runs and not runs[name]]:
        raise StepError(f"{empty[0]}: no whole checkpoint to evaluate (did train write any?)")
    uris = {name: [c["uri"] for c in runs[name]] if name in runs else [source] if source else []
            for name, source in targets}
    infos = {uri: read_json(f"{uri}/{CHECKPOINT_INFO}") for named in uris.values() for uri in named}
    base_model = config.base_model or next((info["base_model"] for info in infos.values()), None)
    if not base_model:
        raise StepError("--targets of the base model alone need --base-model")
    failed = {}
    for name, named in uris.items():  # every LoRA file, before anything loads
        try:
            lora_files.check_checkpoints(named, base_model)
        except StepError as exc:
            if name not in config.optional:
                raise
            failed[name] = str(exc)
            print(f"warning: {name} not evaluated: {exc}", file=sys.stderr)
    shared = Evaluator(config, base_model)
    results = []
    for name, source in (t for t in targets if t[0] not in failed):
        one = replace(config, targets=[], optional=[], output=join(config.output, name))
        if name in runs:
            results.append(each_checkpoint(replace(one, training_run=source), shared, runs[name], infos))
        else:
            results.append(evaluate(replace(one, checkpoint=source), shared, infos[source] if source else BASE_INFO))
    return {"output": config.output, "targets": [name for name, _ in targets if name not in failed],
            "evaluations": results, "failed": failed}


def parse_target(target: str) -> tuple[str, str | None]:
    """(NAME, SOURCE or None for the base model) of `NAME=SOURCE`; NAME is one folder name."""
    name, equals, source = target.partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise StepError(f"--targets {target!r}: NAME=SOURCE, NAME a folder name (letters, digits, . _ -)")
    return name, source or None


def evaluate_training_run(config: EvaluateConfig) -> dict:
    """Every whole checkpoint of one training run, oldest first, in one process: one pipeline, LoRA swapped."""
    if config.checkpoint:
        raise StepError("--checkpoint and --training-run: give one or the other")
    checkpoints = list_checkpoints(config.training_run)
    if not checkpoints:
        raise StepError(f"{config.training_run}: no whole checkpoint to evaluate (did train write any?)")
    infos = {c["uri"]: read_json(f"{c['uri']}/{CHECKPOINT_INFO}") for c in checkpoints}
    base_model = config.base_model or infos[checkpoints[0]["uri"]]["base_model"]
    lora_files.check_checkpoints([c["uri"] for c in checkpoints], base_model)
    return each_checkpoint(config, Evaluator(config, base_model), checkpoints, infos)


def each_checkpoint(config: EvaluateConfig, shared: "Evaluator", checkpoints: list[dict], infos: dict) -> dict:
    """A training run's checkpoints, oldest first, each into <output>/step-<N>; one already whole is not redone."""
    results = []
    for c in checkpoints:
        info = infos[c["uri"]]
        one = replace(config, checkpoint=c["uri"], training_run=None, output=join(config.output, f"step-{c['step']}"))
        done = read_json(f"{one.output}/metrics.json") if is_whole(one.output) else None
        if done and done.get("suite") == shared.suite:  # written after it was logged: nothing left to do
            results.append(summary({k: v for k, v in done.items() if k not in SUITE_FIELDS}) | {"done": True})
        else:
            results.append(evaluate(one, shared, info))
    last = infos[checkpoints[-1]["uri"]]
    return {"training_run": config.training_run, "learning_rate": last["learning_rate"],
            "run_id": last.get("run_id"), "output": config.output, "evaluations": results}


def evaluate(config: EvaluateConfig, shared: "Evaluator", info: dict) -> dict:
    """One checkpoint (or the base model): copied from the kept evaluations, or generated and scored."""
    checkpoint = read_dir(config.checkpoint) if config.checkpoint else None
    weights = file_digest(checkpoint / LORA_WEIGHTS) if checkpoint else "base"
    kept = config.cache and join(config.cache, f"{weights}-{shared.suite}")
    if kept and is_whole(kept):
        return reuse(kept, config, info)
    images = shared.images
    generated = images.for_prompts(config.prompts, checkpoint)
    base = shared.base_class_images
    preserved = images.for_prompts(config.class_prompts, checkpoint) if checkpoint else base
    broken = any(image is None for row in generated + preserved for image in row)
    scores = worst(config) if broken else shared.scorer.score(generated, preserved, base, config)
    flagged = [f"prompt {j} image {k}: {reason}" for j, row in enumerate(generated)
               for k, reason in enumerate(screen_all(shared.screen, row)) if reason]
    result = {**checkpoint_fields(info, config), "suite": shared.suite, "broken": broken, **scores,
              "screened": sum(map(len, generated)), "flagged": len(flagged), "flagged_images": flagged}
    if info.get("run_id"):  # before the folder is written: a whole folder has been logged
        log_to_training_run(info, config.checkpoint, config.prompts, means(scores) | {"flagged": len(flagged)},
                            generated)
    with write_dir(config.output) as out:
        (out / "images").mkdir()
        for kind, rows in (("p", generated), ("class", preserved), ("base", base)):
            for j, row in enumerate(rows):
                for k, image in enumerate(row):
                    if image is not None:
                        image.save(out / "images" / f"{kind}{j:02d}-{k}.png")
        write_metrics(out, result, config)
    if kept:  # after logging: a kept evaluation has been logged
        with write_dir(kept) as out:
            shutil.copytree(read_dir(config.output), out, dirs_exist_ok=True)
    return summary(result)


class Evaluator:
    """What every evaluation in one process shares, each made on first use (a kept evaluation needs none of it):
    the suite's fingerprint, the pipeline, the scorer and the base model's class images."""

    def __init__(self, config: EvaluateConfig, base_model: str):
        self.config, self.base_model = config, base_model
        self.suite = suite_fingerprint(config, base_model)

    @cached_property
    def images(self) -> "Generator":
        return Generator(self.base_model, self.config)

    @cached_property
    def base_class_images(self) -> list[list[Image.Image | None]]:
        return self.images.for_prompts(self.config.class_prompts, None)

    @cached_property
    def screen(self) -> Screen:
        return load_screen(self.config.screen, self.config.screen_threshold)

    @cached_property
    def scorer(self) -> "Scorer":
        return Scorer(self.config)


def reuse(kept: str, config: EvaluateConfig, info: dict) -> dict:
    """The kept evaluation of these LoRA weights on this suite, as this checkpoint's."""
    metrics = read_json(f"{kept}/metrics.json")
    result = {**{k: v for k, v in metrics.items() if k not in SUITE_FIELDS},
              **checkpoint_fields(info, config), "cached": True}
    with write_dir(config.output) as out:
        shutil.copytree(read_dir(kept, whole=True) / "images", out / "images")
        write_metrics(out, result, config)
    if info.get("run_id"):  # the same weights from another training run (a rerun with the same data and seed)
        images = read_dir(config.output) / "images"
        generated = [[Image.open(f) if (f := images / f"p{j:02d}-{k}.png").exists() else None
                      for k in range(config.images_per_prompt)] for j in range(len(config.prompts))]
        log_to_training_run(info, config.checkpoint, config.prompts, means(result), generated)
    return summary(result)


def checkpoint_fields(info: dict, config: EvaluateConfig) -> dict:
    """What a result says about the checkpoint it scores (from its dreamline.json)."""
    return {"step": info["step"], "learning_rate": info["learning_rate"], "run_id": info.get("run_id"),
            "champion_version": info.get("champion_version"), "checkpoint": config.checkpoint,
            "base": config.checkpoint is None, "trained_on": info.get("base_model")}


def write_metrics(out: Path, result: dict, config: EvaluateConfig) -> None:
    seeds = {"seeds": [prompt_seeds(config, j) for j in range(len(config.prompts))],
             "class_seeds": [prompt_seeds(config, j) for j in range(len(config.class_prompts))]}
    write_json(out / "metrics.json", {**result, "prompts": config.prompts, "class_prompts": config.class_prompts,
                                      "clip_t_texts": clip_t_texts(config.prompts, config.identifier), **seeds})


def means(result: dict) -> dict[str, float]:
    return {k: result[k] for k in METRICS if result.get(k) is not None}


def summary(result: dict) -> dict:
    """The step's JSON line: the means, not the per-image lists (those are in metrics.json)."""
    return {k: v for k, v in result.items() if k not in ("per_image", "per_class_image", "flagged_images")}


def suite_fingerprint(config: EvaluateConfig, base_model: str) -> str:
    """Everything that decides the images and how they are scored (not which LoRA is scored, nor where anything is
    written); the instance images by their content."""
    import diffusers
    import transformers

    suite = {k: v for k, v in asdict(config).items()
             if k not in ("checkpoint", "training_run", "targets", "optional", "output", "base_model", "cache")}
    suite |= {"base_model": base_model, "instance_images": content_hash(read_dir(config.instance_images) / "images"),
              "vae": config.vae and model_fingerprint(config.vae, parts=[""]),  # a local folder by its content
              "versions": [SCORING_VERSION, torch.__version__, diffusers.__version__, transformers.__version__]}
    return hashlib.sha256(json.dumps(suite, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def load_instance_images(uri: str) -> list[Image.Image]:
    folder = read_dir(uri)
    manifest = load(f"{uri}/manifest.json")
    images = [Image.open(inside(folder, r.get("file"), f"{uri}/manifest.json: records[{i}].file")).convert("RGB")
              for i, r in enumerate(manifest["records"])]
    if not images:
        raise StepError(f"{uri}: no instance images to compare with")
    return images


class Scorer:
    """Both evaluators and the embeddings of the real images, loaded once per process."""

    def __init__(self, config: EvaluateConfig):
        real = load_instance_images(config.instance_images)
        self.clip, self.dino = ClipEmbedder(config.clip_model), DinoEmbedder(config.dino_model)
        self.clip_real, self.dino_real = self.clip.images(real), self.dino.images(real)
        self._dino_base: tuple[int, torch.Tensor] | None = None

    def score(self, generated, preserved, base, config: EvaluateConfig) -> dict:
        """Mean scores, and the same per image (nested per prompt, then seed) so evaluations can be paired."""
        flat = [image for row in generated for image in row]
        flat_prompts = [p for p, row in zip(clip_t_texts(config.prompts, config.identifier), generated) for _ in row]
        clip_generated = self.clip.images(flat)
        per_image = {
            "clip_t": matched_cosines(clip_generated, self.clip.texts(flat_prompts)),
            "clip_i": mean_cosines(clip_generated, self.clip_real),
            "dino": mean_cosines(self.dino.images(flat), self.dino_real),
        }
        scores = {"per_image": {k: nest(v, config.images_per_prompt) for k, v in per_image.items()}}
        if config.class_prompts:
            with_lora = [image for row in preserved for image in row]
            dino_base = self.base_embeddings(base)
            preservation = matched_cosines(self.dino.images(with_lora), dino_base)
            scores["per_class_image"] = {"preservation": nest(preservation, config.images_per_prompt)}
            per_image["preservation"] = preservation
            if config.checkpoint is None:  # how alike two draws of the class are: preservation's yardstick
                scores["class_similarity"] = off_diagonal_mean(dino_base, config.images_per_prompt)
        return {**{k: float(np.mean(v)) for k, v in per_image.items()}, **scores}

    def base_embeddings(self, base) -> torch.Tensor:
        """DINO embeddings of the base model's class images (the same for every checkpoint of a process)."""
        if self._dino_base is None or self._dino_base[0] != id(base):
            self._dino_base = (id(base), self.dino.images([image for row in base for image in row]))
        return self._dino_base[1]


def clip_t_texts(prompts: list[str], identifier: str | None) -> list[str]:
    """What CLIP-T scores each prompt's images against: the prompt without the identifier token (and the space
    after it), "a sks dog in the jungle" -> "a dog in the jungle"; the prompt itself without an identifier."""
    if not identifier:
        return list(prompts)
    token = re.compile(rf"(?<!\S){re.escape(identifier)}(\s+|$)")
    return [" ".join(token.sub("", prompt).split()) for prompt in prompts]


def worst(config: EvaluateConfig) -> dict:
    """The lowest possible scores, per image too: a broken checkpoint loses every pairing."""
    rows = lambda count: [[-1.0] * config.images_per_prompt for _ in range(count)]  # noqa: E731
    result = {k: -1.0 for k in IMAGE_METRICS} | {"per_image": {k: rows(len(config.prompts)) for k in IMAGE_METRICS}}
    if config.class_prompts:
        result |= {"preservation": -1.0, "per_class_image": {"preservation": rows(len(config.class_prompts))}}
    return result


def nest(values: list[float], per_prompt: int) -> list[list[float]]:
    return [values[i:i + per_prompt] for i in range(0, len(values), per_prompt)]


def off_diagonal_mean(embeddings: torch.Tensor, per_prompt: int) -> float | None:
    """Mean cosine of two different images of the same class prompt (None with one image per prompt)."""
    if per_prompt < 2:
        return None
    sims = []
    for start in range(0, len(embeddings), per_prompt):
        block = embeddings[start:start + per_prompt] @ embeddings[start:start + per_prompt].T
        sims.append((block.sum() - block.diagonal().sum()).item() / (per_prompt * (per_prompt - 1)))
    return float(np.mean(sims))
