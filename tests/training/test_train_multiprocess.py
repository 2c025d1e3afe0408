"""Data-parallel training: the train step under torchrun with two CPU processes (gloo), the way `accelerate launch
--multi_gpu` runs it on a multi-GPU node. Only the main process logs, writes checkpoints and reports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from dreamline.operators import step_argv
from sd_tasks.core import tracking
from sd_tasks.training import train


def torchrun(options: dict, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "sd_tasks", *step_argv("train", options)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def options(cache, models, tmp_path_factory) -> dict:
    return {"cache": cache, "output": str(tmp_path_factory.mktemp("ddp") / "lora"), "base_model": models["sdxl"],
            "learning_rate": 1e-3, "max_steps": 4, "checkpointing_steps": 2, "lr_scheduler": "linear",
            "experiment": "ddp"}


@pytest.fixture(scope="module")
def two_processes(options) -> subprocess.CompletedProcess:
    return torchrun(options)


def test_two_processes_train_and_the_main_one_reports(two_processes, options):
    assert two_processes.returncode == 0, two_processes.stderr[-3000:]
    lines = two_processes.stdout.strip().splitlines()
    assert len(lines) == 1, "one result line, from the main process"
    result = json.loads(lines[0])
    assert [c["step"] for c in result["checkpoints"]] == [2, 4]
    assert all(Path(c["uri"], train.LORA_WEIGHTS).exists() for c in result["checkpoints"])

    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]], "one MLflow run: only the main process logs"
    assert [m.step for m in client.get_metric_history(result["run_id"], "loss")] == [1, 2, 3, 4]
    # The linear schedule counts optimisation steps, not steps times processes.
    lr = [m.value for m in sorted(client.get_metric_history(result["run_id"], "lr"), key=lambda m: m.step)]
    assert lr == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_the_second_process_contributes_gradients(two_processes, options, tmp_path):
    # With its own data order and noise, the second process changes the averaged gradient: the weights are not the
    # ones one process alone would reach.
    alone = train.run(train.TrainConfig(**{**options, "output": str(tmp_path / "alone"), "experiment": "ddp-alone"}))
    parallel = load_file(f"{options['output']}/checkpoint-4/{train.LORA_WEIGHTS}")
    single = load_file(f"{alone['checkpoints'][-1]['uri']}/{train.LORA_WEIGHTS}")
    assert parallel.keys() == single.keys()
    assert not all(torch.equal(parallel[k], single[k]) for k in parallel)


def test_two_processes_resume_from_the_main_process_checkpoint(two_processes, options):
    more = torchrun({**options, "max_steps": 6})
    assert more.returncode == 0, more.stderr[-3000:]
    result = json.loads(more.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 4 and [c["step"] for c in result["checkpoints"]] == [2, 4, 6]
    assert more.stderr.count(f"resuming from {options['output']}/checkpoint-4") == 2  # both processes resume
    run = tracking.client().get_run(result["run_id"])  # the same MLflow run goes on, its changed param as a tag
    assert run.data.params["max_steps"] == "4" and run.data.tags["dreamline.resumed_with.max_steps"] == "6"


def test_a_loss_that_diverges_in_one_process_stops_every_process(options, tmp_path):
    # The image the main process draws first gets infinite latents (as fp16 overflow would give): only that
    # process's loss is NaN. Both must stop with the divergence error, not leave the other waiting in the gradient
    # all-reduce for a peer that has gone (gloo: "connection closed"; NCCL: a hang until its timeout).
    bad = shutil.copytree(options["cache"], tmp_path / "cache")
    first = next(train.LatentCache(str(bad)).batches(1, seed=0))["latent_moments"][0]  # the main process's seed
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = bad / manifest["shards"][0] / "latents.safetensors"
    tensors = load_file(shard)
    [key] = [k for k, v in tensors.items() if k.endswith(".latent_moments") and torch.equal(v.float(), first)]
    save_file({**tensors, key: torch.full_like(tensors[key], float("inf"))}, shard)

    run = torchrun({**options, "cache": str(bad), "output": str(tmp_path / "lora"), "max_steps": 3})
    assert run.returncode != 0
    assert run.stderr.count("error: train: loss is nan at step 1: training diverged") == 2, run.stderr[-3000:]
