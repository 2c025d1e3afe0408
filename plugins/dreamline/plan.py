"""The options of the DAG's mapped steps, from the form's Params and what earlier steps returned.

Plain functions, so the DAG's TaskFlow tasks stay wiring and `make pods` (dreamline.pods) can show the pods a run
would launch without running one.
"""
from __future__ import annotations

import math

from dreamline.deployment import DEPLOYMENT
from dreamline.params import evaluation_prompts


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
        "output": f"{run}/train/lr-{lr:g}", "base_model": params["base_model"],
        "learning_rate": lr, "max_steps": params["max_steps"], "checkpointing_steps": params["checkpointing_steps"],
        "rank": params["rank"], "mixed_precision": params["mixed_precision"],
        "gradient_checkpointing": params["gradient_checkpointing"], "seed": params["seed"],
        "experiment": params["subject"], "parent_run_id": parent_run_id,
        "tags": [f"dataset.{k}={dataset[k]}" for k in ("rev", "commit", "hash")],
    } for lr in params["learning_rates"]]


def evaluation_options(params: dict, run: str, training_results: list[dict], champion: dict) -> list[dict]:
    """One `evaluate` options dict per checkpoint of every training run that finished, and one for the current
    champion, so the new model is compared with it on today's evaluation suite (evaluations are kept by LoRA
    weights and suite: while the suite is unchanged, the champion's is copied, not redone)."""
    suite = {"instance_images": f"{run}/resized", "prompts": evaluation_prompts(params),
             "class_prompts": [params["class_prompt"]], "clip_model": params["clip_model"],
             "dino_model": params["dino_model"], "base_model": params["base_model"],
             "images_per_prompt": params["images_per_prompt"], "num_inference_steps": params["inference_steps"],
             "resolution": params["resolution"], "dtype": params["inference_dtype"], "vae": params["vae"] or None,
             "seed": params["seed"], "cache": DEPLOYMENT.cache_dir("evaluations")}
    candidates = [(c["uri"], f"lr-{r['learning_rate']:g}/step-{c['step']}")
                  for r in training_results for c in r["checkpoints"]]
    if champion["checkpoint"]:
        candidates.append((champion["checkpoint"], f"champion-v{champion['version']}"))
    return [{"checkpoint": uri, "output": f"{run}/eval/{name}", **suite} for uri, name in candidates]
