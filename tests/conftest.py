"""Shared fixtures: offline tiny models, a DVC data registry of the sample subject, and a run folder prepared up to
the encode cache. Everything is real (diffusers, peft, DVC, MLflow on sqlite) and small."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests mirror the code's layout, a folder per stage (core/, data/, ..., orchestration/, deployment/); each folder
# is on the path so that a test module can use another's helpers by its name (`from test_pods import pods_command`).
TEST_FOLDERS = sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and any(p.glob("test_*.py"))
                      and not (p / "__init__.py").exists())
sys.path[:0] = [str(REPO), str(REPO / "plugins"), *map(str, TEST_FOLDERS)]
SAMPLE = REPO / "sample_data" / "dog"
# Runs a step CLI (argv after it) and prints, last on stderr, `peak-kb N`: the high-water mark of the process's own
# memory (VmHWM; getrusage's ru_maxrss would include what the forking parent held: Linux keeps it across exec).
MEASURED_STEP = ("import re, sys; from sd_tasks import cli; code = cli.main(sys.argv[1:]); "
                 "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
                 "print('peak-kb', hwm, file=sys.stderr); sys.exit(code)")
# The fewest evaluation prompts a run takes: two choose the checkpoint, two confirm it (dreamline.params).
FOUR_PROMPTS = ["a {instance} in the snow", "a red {instance}", "a {instance} on the beach",
                "a {instance} with a hat"]


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """DREAMLINE_HOME for the whole session; MLflow goes to its sqlite store."""
    path = tmp_path_factory.mktemp("dreamline-home")
    os.environ["DREAMLINE_HOME"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return path


@pytest.fixture(scope="session")
def models(home) -> dict:
    from sd_tasks.models.tiny_model import TinyModelConfig, run

    return run(TinyModelConfig(output=str(home / "models" / "tiny-sdxl"), evaluators=str(home / "models" / "eval")))


@pytest.fixture(scope="session")
def registry(home) -> Path:
    from sd_tasks.data.dataset import PublishConfig, publish

    repo = home / "data-registry"
    publish(PublishConfig(source=str(SAMPLE), repo=str(repo), path="dog", tag="dog-v1",
                          remote=str(home / "dvc-remote")))
    return repo


@pytest.fixture(scope="session")
def prepared(home, models, registry) -> Path:
    """A run folder taken through dataset, validate, caption and resize (64 px); `cache` encodes it."""
    from sd_tasks.data import caption, dataset, resize, validate

    run = home / "runs" / "prepared"
    dataset.run(dataset.DatasetConfig(repo=str(registry), path="dog", rev="dog-v1", output=str(run / "dataset")))
    validate.run(validate.ValidateConfig(input=str(run / "dataset" / "images"), output=str(run / "validated")))
    caption.run(caption.CaptionConfig(report=str(run / "validated"), output=str(run / "captions"),
                                      instance_prompt="a photo of sks dog"))
    resize.run(resize.ResizeConfig(captions=str(run / "captions"), output=str(run / "resized"), resolution=64))
    return run


@pytest.fixture(scope="session")
def cache(prepared, models) -> str:
    """URI of the encode cache of the prepared run."""
    from sd_tasks.data import encode

    return encode.run(encode.EncodeConfig(images=str(prepared / "resized"), output=str(prepared / "cache"),
                                          base_model=models["sdxl"]))["cache"]


def tree_snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file, to prove a folder was left untouched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
