"""The options of the DAG's mapped steps, from the form's Params and what earlier steps returned.

Plain functions, so the DAG's TaskFlow tasks stay wiring and `make pods` (dreamline.pods) can show the pods a run
would launch without running one.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import string

from dreamline.deployment import DEPLOYMENT
from dreamline.params import (MAX_CHECKPOINTS, MAX_RUNGS, MIN_EVALUATION_PROMPTS, evaluation_prompts, integer_params,
                              judging_params)

# Form settings that do not change what a run trains: left out of the recipe's fingerprint, so changing one (how
# checkpoints are judged, promoted or sharded, which version of the data) does not make a night retrain for nothing.
NOT_RECIPE = frozenset({"force", "subject", "dataset_repo", "dataset_path", "dataset_version", "encode_shard_size",
                        *judging_params()})
# Confirmation images use seeds from another range than selection's (seed + 1000 * prompt + image, both below
# 1,000,000 with at most 100 prompts and 64 images each), so the winner is judged on images it was not chosen on;
# the range rotates with the dataset's content (one of SEED_ROTATIONS), so nights of comparisons do not all lean on
# one fixed set of images.
CONFIRMATION_SEED_OFFSET = 1_000_000
SEED_ROTATIONS = 1000
MAX_MAPPED = 1024  # Airflow's [core] max_map_length
# A form's text becomes one argument of a step's command line (Linux takes at most 128 KiB per argument; a NUL none)
# and part of prompts, paths and URLs, where a control character is never meant.
MAX_TEXT = 2000
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class RecipeError(ValueError):
    """A trigger-form combination the JSON schema cannot refuse; the message is one line."""


def check_recipe(params: dict, known: frozenset[str] | None = None) -> dict:
    """Refuse, in one line, what the form's JSON schema cannot say (a setting it does not know, among `known`);
    return the numbers a run will launch."""
    if known is not None and (said := unknown_setting(params, known)):
        raise RecipeError(said)
    check_values(params)
    every, steps = params["checkpointing_steps"], params["max_steps"]
    if steps % every:
        raise RecipeError(f"max_steps {steps} is not a multiple of the checkpoint interval {every}: the last steps "
                          f"would not be evaluated (try {steps - steps % every or every} or {steps + every - steps % every})")
    if steps // every > MAX_CHECKPOINTS:
        raise RecipeError(f"max_steps {steps} / checkpoint interval {every} = {steps // every} checkpoints per "
                          f"learning rate; at most {MAX_CHECKPOINTS} (each is evaluated): raise the interval")
    if params["sweep_strategy"] == "halving":
        check_rungs(params["halving_rungs"], every, steps)
    folders: dict[str, float] = {}
    for lr in params["learning_rates"]:
        name = run_name(lr)
        if name in folders:
            raise RecipeError(f"learning rates {folders[name]!r} and {lr!r} would share the run folder {name}: "
                              f"use values that differ in their first 6 significant digits")
        folders[name] = lr
    if 0 < len(params["evaluation_prompts"]) < MIN_EVALUATION_PROMPTS:
        raise RecipeError(f"evaluation_prompts: {len(params['evaluation_prompts'])} given, at least "
                          f"{MIN_EVALUATION_PROMPTS} (half choose the checkpoint, the other half confirm it), or none "
                          f"for DreamBench's 25")
    for template in params["evaluation_prompts"]:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None
                  and (f not in ("instance", "class_noun") or spec or conv)] if _parses(template) else [None]
        if fields or "{instance}" not in template:
            raise RecipeError(f"evaluation prompt {template!r}: contains {{instance}} and no other field than "
                              f"{{instance}} and {{class_noun}}")
    evaluations = len(params["learning_rates"]) * (steps // every) + 2  # and the champion and the base model
    if evaluations > MAX_MAPPED:
        raise RecipeError(f"{evaluations} evaluations would exceed Airflow's {MAX_MAPPED} mapped tasks")
    return {"training_runs": len(params["learning_rates"]), "evaluations": evaluations,
            "recipe_hash": recipe_hash(params)}


def unknown_setting(conf: dict, known) -> str | None:
    """The first of `conf`'s settings that is not among `known`, said in one line with the closest known name; None
    when all are known. The API server refuses a trigger with it (dreamline.trigger_guard), the run's first task too."""
    if not (unknown := sorted(set(conf) - set(known))):
        return None
    close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
    return (f"{unknown[0]}: not a setting of this DAG" + (f"; did you mean {close[0]}?" if close else "") +
            " (nothing is run with unknown settings)")


def check_values(params: dict) -> None:
    """What JSON schema lets through: NaN and infinity as numbers, 500.0 as an integer, control characters and
    megabytes as text."""
    integers = integer_params()
    for name, value in params.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise RecipeError(f"{name}: {item!r} is not a finite number")
            if isinstance(item, float) and name in integers:
                raise RecipeError(f"{name}: {item!r} is not an integer (write {item:.0f})")
            if isinstance(item, str) and len(item) > MAX_TEXT:
                raise RecipeError(f"{name}: {len(item):,} characters, at most {MAX_TEXT:,}")
            if isinstance(item, str) and (found := CONTROL.search(item)):
                raise RecipeError(f"{name}: {item[:60]!r} contains the control character U+{ord(found[0]):04X}")


def check_rungs(rungs: list[int], every: int, steps: int) -> None:
    if len(rungs) > MAX_RUNGS:
        raise RecipeError(f"halving rungs {rungs}: at most {MAX_RUNGS}")
    if rungs != sorted(set(rungs)) or rungs[-1] >= steps:
        raise RecipeError(f"halving rungs {rungs}: ascending, each below max_steps {steps}")
    if odd := [r for r in rungs if r % every]:
        raise RecipeError(f"halving rung {odd[0]} is not a multiple of the checkpoint interval {every}: a rung is "
                          f"judged on its checkpoint")


def sweep_stages(params: dict) -> list[int]:
    """The step each stage of the sweep trains to: max_steps for a grid; each rung, then max_steps, for halving."""
    rungs = params["halving_rungs"] if params["sweep_strategy"] == "halving" else []
    return [*rungs, params["max_steps"]]


def stop_at(params: dict, stage: int) -> int | None:
    """`train --stop-at-step` of a stage (None: train to max_steps)."""
    step = sweep_stages(params)[stage]
    return step if step < params["max_steps"] else None


def _parses(template: str) -> bool:
    try:
        list(string.Formatter().parse(template))
        return True
    except ValueError:  # a lone { or }
        return False


def recipe_hash(params: dict) -> str:
    """Fingerprint of everything in the form that changes what is trained or how it is judged."""
    recipe = {k: v for k, v in sorted(params.items()) if k not in NOT_RECIPE}
    return "sha256:" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def run_name(learning_rate: float) -> str:
    """A training run's folder under the run folder, and its evaluations' prefix."""
    return f"lr-{learning_rate:g}"


# The form's model settings; `pin-models` (task `models`) pins each hub model to a commit before any other step.
MODEL_SETTINGS = ("base_model", "clip_model", "dino_model", "vae", "caption_model")


def models_to_pin(params: dict, run: str) -> dict:
    """`pin-models` options: every model the run loads (the captioning model only when captions come from it)."""
    options = {name: params[name] or None for name in ("base_model", "clip_model", "dino_model", "vae")}
    if params["caption_strategy"] == "model":
        options["caption_model"] = params["caption_model"]
    return {**options, "output": f"{run}/models"}


def with_pinned_models(params: dict, pinned: dict | None) -> dict:
    """The form's values with every model setting the `models` task pinned as it pinned it (`id@sha`)."""
    return {**params, **{name: ref for name, ref in (pinned or {}).items() if name in MODEL_SETTINGS}}


def encode_shard_options(params: dict, run: str, images: int) -> list[dict]:
    """One `encode` options dict per shard of at most `encode_shard_size` images (one pod each)."""
    count = max(1, math.ceil(images / params["encode_shard_size"]))
    return [{"images": f"{run}/resized", "output": DEPLOYMENT.cache_dir("encode"), "flip": params["flip"],
             "base_model": params["base_model"], "shard_index": i, "num_shards": count} for i in range(count)]


def training_options(params: dict, run: str, dataset: dict, cache: str, parent_run_id: str,
                     class_cache: str | None) -> list[dict]:
    """One `train` options dict per learning rate."""
    return [{
        "cache": cache, "class_cache": class_cache, "prior_loss_weight": params["prior_loss_weight"],
        "output": f"{run}/train/{run_name(lr)}", "base_model": params["base_model"],
        "learning_rate": lr, "max_steps": params["max_steps"], "checkpointing_steps": params["checkpointing_steps"],
        "rank": params["rank"], "train_text_encoder": params["train_text_encoder"],
        "mixed_precision": params["mixed_precision"],
        "gradient_checkpointing": params["gradient_checkpointing"], "seed": params["seed"],
        "experiment": params["subject"], "parent_run_id": parent_run_id, "stop_at_step": stop_at(params, 0),
        "gpu_hour_price": DEPLOYMENT.gpu_hour_price,
        "tags": [f"dataset.{k}={dataset[k]}" for k in ("rev", "commit", "hash")]
        + [f"consent.id={dataset.get('consent_id', 'none')}"],
    } for lr in params["learning_rates"]]


def halving_options(params: dict, run: str, rung: int, training_results: list[dict]) -> list[dict]:
    """`halve` options at rung `rung` (1-based) for the learning rates that reached it; [] when the sweep has no
    such rung (a grid, or fewer rungs), which skips the rung's tasks."""
    if rung >= len(sweep_stages(params)) or not training_results:
        return []
    return [{"evaluations": f"{run}/eval", "output": f"{run}/sweep",
             "learning_rates": sorted(r["learning_rate"] for r in training_results),
             "rung": sweep_stages(params)[rung - 1], "max_steps": params["max_steps"], "keep": params["halving_keep"],
             **{k: params[k] for k in ("weight_accuracy", "weight_flexibility", "weight_preservation")}}]


def continued_training(params: dict, rung: int, first_stage: list[dict], kept: list[float]) -> list[dict]:
    """The `train` options of the learning rates kept at rung `rung`: the first stage's, to the next stop; each
    resumes from its rung checkpoint."""
    return [{**options, "stop_at_step": stop_at(params, rung)} for options in first_stage
            if options["learning_rate"] in kept]


def evaluation_suite(params: dict, run: str) -> dict:
    """The `evaluate` options every checkpoint, the champion and the base model are screened with:
    `screening_prompts` of the selection prompts spread over the list (dreamline.params.evaluation_prompts: scenes,
    then clothes and styles), few images and steps with a fast solver. The confirmation (`confirmation_options`)
    spends the full protocol on three models only."""
    return {"instance_images": f"{run}/resized",
            "prompts": spread(evaluation_prompts(params, "selection"), params["screening_prompts"]),
            "scheduler": params["screening_scheduler"] or None,
            "identifier": params["instance_token"],
            "class_prompts": [params["class_prompt"]], "clip_model": params["clip_model"],
            "dino_model": params["dino_model"], "base_model": params["base_model"],
            "images_per_prompt": params["images_per_prompt"], "num_inference_steps": params["inference_steps"],
            "resolution": params["resolution"], "dtype": params["inference_dtype"], "vae": params["vae"] or None,
            "seed": params["seed"], "cache": DEPLOYMENT.cache_dir("evaluations"), "screen": DEPLOYMENT.screen}


def spread(items: list, count: int) -> list:
    """`count` of `items` (all when fewer) evenly spaced over the list, in order."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def evaluation_options(params: dict, run: str, training_results: list[dict], champion: dict | None,
                       base: bool = True) -> list[dict]:
    """The `evaluate` tasks of the checkpoints: every checkpoint of each training run that finished, the current
    champion (so the new model is compared with it on today's evaluation suite) and the base model alone (the
    yardstick of normalised scores), shared out over as many processes as there are GPU slots (`evaluate
    --targets`): each loads the pipeline and the evaluators once for all of its evaluations, and no more run than
    the GPUs can take at once. Evaluations are kept by LoRA weights and suite, so while the suite is unchanged the
    champion's and the base model's are copied, not redone. A later rung of successive halving evaluates only its
    training runs (`champion` None, `base` False)."""
    targets = [(len(r.get("checkpoints") or [None]), f"{run_name(r['learning_rate'])}={run}/train/"
                f"{run_name(r['learning_rate'])}") for r in training_results]
    if champion and champion["checkpoint"]:
        targets.append((1, f"champion-v{champion['version']}={champion['checkpoint']}"))
    if base:
        targets.append((1, "base="))
    groups: list[list] = [[] for _ in range(min(DEPLOYMENT.gpu_slots, len(targets)))]
    for cost, target in sorted(targets, key=lambda t: -t[0]):  # the most checkpoints first, to the least loaded
        min(groups, key=lambda g: sum(c for c, _ in g)).append((cost, target))
    suite = evaluation_suite(params, run)
    return [{"targets": [target for _, target in group], "output": f"{run}/eval", **suite,
             **optional_champion([target for _, target in group])} for group in groups]


def evaluation_folders(options: list[dict]) -> list[str]:
    """Every folder the `evaluate` tasks of `options` write: <output>/<NAME> of each target."""
    return [f"{o['output']}/{target.partition('=')[0]}" for o in options for target in o["targets"]]


def confirmation_options(params: dict, run: str, selected: dict, champion: dict, dataset_hash: str) -> dict:
    """`evaluate` options for the confirmation suite, in one process: the selected checkpoint, the champion and the
    base model on the prompts selection never saw, seeds it did not use (rotating with the dataset's content), more
    images per prompt and the full number of steps with the base model's own scheduler; preservation on those
    prompts with the class noun in place of the subject (a dozen class prompts, not one). `register` decides the
    promotion on these."""
    suite = {**evaluation_suite(params, run), "seed": confirmation_seed(params["seed"], dataset_hash),
             "prompts": evaluation_prompts(params, "confirmation"),
             "class_prompts": evaluation_prompts(params, "confirmation", subject=False),
             "images_per_prompt": params["confirmation_images_per_prompt"],
             "num_inference_steps": params["confirmation_inference_steps"], "scheduler": None}
    targets = [f"challenger={selected['checkpoint']}", "base="]
    if champion["checkpoint"]:
        targets.insert(1, f"champion-v{champion['version']}={champion['checkpoint']}")
    return {"targets": targets, "output": f"{run}/confirm", **suite, **optional_champion(targets)}


def optional_champion(targets: list[str]) -> dict:
    """`evaluate`'s `optional`: the champion's target, if among `targets`. A champion whose LoRA file today's base
    model refuses is reported, not fatal: the night's checkpoints are still evaluated, and `register` registers the
    challenger and says the champion was not compared (it is kept)."""
    names = [t.partition("=")[0] for t in targets if t.startswith("champion-v")]
    return {"optional": names} if names else {}


def confirmation_seed(seed: int, dataset_hash: str) -> int:
    """The confirmation suite's base seed: past selection's range, in one of SEED_ROTATIONS ranges chosen by the
    dataset's content hash (the same dataset, the same seeds: a retried night is judged on the same images)."""
    rotation = int(hashlib.sha256(dataset_hash.encode()).hexdigest(), 16) % SEED_ROTATIONS
    return seed + CONFIRMATION_SEED_OFFSET * (1 + rotation)
