"""What a night costs: one record per try of every step, summed per step and for the night.

The Airflow side names a record file for each try of each task (`DREAMLINE_COST_RECORD`: `<run>/cost/<task>[.<map
index>].try-<n>.json`); the step CLI writes the process's wall seconds and the GPUs it held when the step ends,
whether it succeeded or failed. A retry is another try and writes its own file, a resumed training (a later rung of
successive halving) is another task; rewriting one try's file replaces it. So summing the files counts every
second once: the failed try's seconds too (the GPU was paid for), never one twice. A process killed outright
(SIGKILL, a lost node) writes nothing: its seconds are missing, not guessed. `register` totals the ledger onto the
pipeline's MLflow run and the registered version, with an estimated price at the deployment's GPU-hour price.
"""
from __future__ import annotations

import json
import os
import re
import sys

from sd_tasks.core.storage import join, list_dir, read_json, write_file

RECORD_ENV = "DREAMLINE_COST_RECORD"
_generated = {"images": 0, "denoising_steps": 0}  # this process's, for its record (count_images)
RECORD = re.compile(r"(?P<task>.+?)(?:\.(?P<map>\d+))?\.try-(?P<try>\d+)\.json")


def gpus_in_use() -> int:
    """GPUs the step held: one per process of `accelerate launch` (WORLD_SIZE), none when it ran on the CPU. Only a
    step that imported torch can have used one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return int(os.environ.get("WORLD_SIZE", "1"))


def count_images(images: int, steps: int) -> None:
    """Count images this process generated (evaluation, class images) and their denoising steps (images x steps:
    what a GPU's time goes with), for its cost record: a night's report says how many it made."""
    _generated["images"] += images
    _generated["denoising_steps"] += images * steps


def peak_memory() -> dict:
    """The process's peak memory: on the GPU it used (allocated by tensors, and reserved by PyTorch's caching
    allocator, which is what the card must hold), else its peak resident memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    import resource

    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def record_step(step: str, seconds: float, exit_code: int) -> None:
    """Say a GPU step's peak GPU memory in its log, and write this try's record where the Airflow side asked for it
    (nothing when run by hand): seconds, GPUs, the devices it saw and its peak memory."""
    gpus, memory = gpus_in_use(), peak_memory()
    if "peak_gpu_memory_gb" in memory:
        print(f"{step}: peak GPU memory {memory['peak_gpu_memory_gb']:.2f} GiB allocated, "
              f"{memory['peak_gpu_reserved_gb']:.2f} GiB reserved", file=sys.stderr, flush=True)
    uri = os.environ.get(RECORD_ENV)
    if not uri or int(os.environ.get("RANK", "0")) != 0:
        return
    record = {"step": step, "seconds": round(seconds, 3), "gpus": gpus, "gpu_seconds": round(seconds * gpus, 3),
              "exit_code": exit_code, "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **memory, **_generated}
    try:
        write_file(uri, json.dumps(record).encode())
    except Exception as exc:  # the step's own outcome matters more than its bill
        print(f"warning: cost record {uri}: {exc}", file=sys.stderr)


def ledger(folder: str) -> list[dict]:
    """Every try's record under `folder`, with its task, map index and try number."""
    records = []
    for name in list_dir(folder):
        if match := RECORD.fullmatch(name):
            records.append({**read_json(join(folder, name)), "task": match["task"],
                            "map_index": int(match["map"]) if match["map"] else -1, "try": int(match["try"])})
    return records


def summarise(records: list[dict], gpu_hour_price: float) -> dict:
    """Per DAG task (its step, mapped tasks, tries, seconds, GPU-seconds, images generated, price), the night's
    totals, and evaluation against training (`evaluate` and `train` steps: seconds, GPU-seconds, images)."""
    steps: dict[str, dict] = {}
    for r in records:
        row = steps.setdefault(r["task"], {"task": r["task"], "step": r["step"], "tasks": set(), "tries": 0,
                                           "seconds": 0.0, "gpu_seconds": 0.0, "images": 0})
        row["tasks"].add(r["map_index"])
        row["tries"] += 1
        row["seconds"] += r["seconds"]
        row["gpu_seconds"] += r["gpu_seconds"]
        row["images"] += r.get("images", 0)
    rows = [{**row, "tasks": len(row["tasks"]), "price": row["gpu_seconds"] / 3600 * gpu_hour_price}
            for row in steps.values()]
    total = {k: sum(row[k] for row in rows) for k in ("tries", "seconds", "gpu_seconds", "price", "images")}
    by_step = {step: {k: sum(row[k] for row in rows if row["step"] == step) for k in ("seconds", "gpu_seconds",
                                                                                      "images")}
               for step in ("train", "evaluate")}
    return {"steps": sorted(rows, key=lambda r: -r["seconds"]), "total": total, "gpu_hour_price": gpu_hour_price,
            "evaluation": by_step["evaluate"], "training": by_step["train"]}


def evaluation_against_training(summary: dict) -> str:
    """'Evaluation: 412 images, 812 GPU-seconds (0.9x training's 903).' (seconds where no GPU was used)."""
    evaluation, training = summary.get("evaluation"), summary.get("training")
    if not evaluation or not training:
        return ""
    unit = "gpu_seconds" if training["gpu_seconds"] or evaluation["gpu_seconds"] else "seconds"
    name = "GPU-seconds" if unit == "gpu_seconds" else "seconds (no GPU)"
    ratio = f"{evaluation[unit] / training[unit]:.2f}x" if training[unit] else "-"
    return (f"Evaluation: {evaluation['images']} images, {evaluation[unit]:.0f} {name} ({ratio} training's "
            f"{training[unit]:.0f}).")


def table(summary: dict) -> str:
    """The per-task cost table of the report (markdown), the most expensive first."""
    lines = ["| task | step | tasks | tries | seconds | GPU-seconds | images | estimated price |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["steps"] + [{"task": "**night**", "step": "", "tasks": "", **summary["total"]}]:
        lines.append(f"| {r['task']} | {r['step']} | {r['tasks']} | {r['tries']} | {r['seconds']:.1f} | "
                     f"{r['gpu_seconds']:.1f} | {r.get('images', 0)} | {r['price']:.2f} |")
    return "\n".join(lines)
