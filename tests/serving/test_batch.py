"""Batch generation through the step CLI, as the batch_images DAG runs it: `champion --alias` fetches one version,
`generate` renders a prompt at every seed (one task per prompt), `batch-report` logs one MLflow run with the grid.
A batch image is the image the server makes for the same version, prompt, seed and settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
from PIL import Image

from conftest import REPO

PROMPTS = ["a photo of sks dog on a beach", "a painting of sks dog"]


def step(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "sd_tasks", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_batch_renders_prompts_by_seeds_with_one_version_and_logs_a_grid(versions, tmp_path):
    from sd_tasks.core import tracking
    from sd_tasks.serving.champions import Champions
    from sd_tasks.serving.renderer import Renderer, Request

    fetched = step("champion", "--model-name=rex-sdxl-lora", "--alias=champion", f"--output={tmp_path}/lora")
    assert (fetched["version"], fetched["instance"]) == (versions["rex"][0], "sks dog")
    for index, prompt in enumerate(PROMPTS):
        made = step("generate", f"--lora={tmp_path}/lora", f"--prompt={prompt}", "--seeds=5", "--seeds=6",
                    "--steps=2", f"--prompt-index={index}", f"--output={tmp_path}/images/prompt-{index}")
        assert (made["images"], made["version"]) == (2, versions["rex"][0])
    manifest = json.loads((tmp_path / "images" / "prompt-1" / "images.json").read_text())
    assert (manifest["prompt"], manifest["seeds"], manifest["model"]) == (PROMPTS[1], [5, 6], "rex-sdxl-lora")

    served = Champions(tmp_path / "adapters", refresh_seconds=0).served("rex")
    [again] = Renderer(served.base_model or manifest["base_model"]).render(
        served, Request(PROMPTS[1], "", (6,), 2, manifest["guidance"], manifest["width"], manifest["height"]))
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "images" / "prompt-1" / "seed-6.png")))

    logged = step("batch-report", f"--images={tmp_path}/images", "--experiment=rex", "--run-name=campaign",
                  "--tags=requested_by=ci")
    assert (logged["images"], logged["prompts"]) == (4, 2)
    run = tracking.client().get_run(logged["run_id"])
    assert run.data.tags["version"] == str(versions["rex"][0]) and run.data.tags["requested_by"] == "ci"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(logged["run_id"])}
    assert {"grid.png", "images"} <= artifacts
    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=logged["run_id"], artifact_path="grid.png",
                                                          dst_path=str(tmp_path / "grid")))
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # two rows by two columns of 64 px tiles, with labels


def test_a_batch_of_a_subject_without_that_alias_or_with_bad_seeds_is_refused_in_one_line(versions, tmp_path):
    none = step("champion", "--model-name=owl-sdxl-lora", f"--output={tmp_path}/owl")
    assert none["checkpoint"] is None  # the DAG's next task fails the run, naming the alias
    step("champion", "--model-name=rex-sdxl-lora", f"--output={tmp_path}/lora")
    step("champion", "--model-name=kim-sdxl-lora", f"--output={tmp_path}/kim")  # consent expired yesterday
    done = subprocess.run([sys.executable, "-m", "sd_tasks", "generate", f"--lora={tmp_path}/kim", "--prompt=x",
                           "--seeds=1", f"--output={tmp_path}/kim-out"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 65 and "consent c-kim expired on" in done.stderr and "no image is made" in done.stderr
    assert not (tmp_path / "kim-out").exists()
    for bad, says in [(["--seeds=1", "--seeds=1"], "give each seed once"), (["--size=100", "--seeds=1"],
                                                                          "must be a multiple of 8")]:
        done = subprocess.run([sys.executable, "-m", "sd_tasks", "generate", f"--lora={tmp_path}/lora", "--prompt=x",
                               *bad, f"--output={tmp_path}/out"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 65 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
