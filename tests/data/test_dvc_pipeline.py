"""dvc.yaml: `dvc repro` in a clean copy of the repo prepares what the DAG prepares, and a second run skips."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from sd_tasks.data import caption, dataset, encode, resize, validate
from sd_tasks.data.dataset import content_hash

STAGES = ("tiny-model", "validate", "caption", "resize", "encode")


def clean_copy(target: Path) -> Path:
    """The working tree's tracked and not-ignored files (what a clone of this work would hold), as a fresh Git repo:
    `git clone` would miss uncommitted work, and DVC pins and diffs through Git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file() and not source.is_symlink():  # skips files deleted in the working tree
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    assert (target / ".dvc" / "config").is_file() and (target / "dvc.yaml").is_file(), "run `dvc init` in the repo"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-qm", "clean copy"], cwd=target, check=True)
    return target


def dvc(repo: Path, *args: str) -> str:
    """`dvc ARGS` as documented in dvc.yaml: the venv first on PATH, so `python -m sd_tasks` is this Python."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def tensor_files(cache_root: Path) -> dict[str, str]:
    """{path below the cache key folder: sha256} of every safetensors file of an encode cache. The key folder's name
    includes the base model's location, so it differs between the two runs; the tensors must not."""
    files = {Path(*p.relative_to(cache_root).parts[1:]).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(cache_root.rglob("*.safetensors"))}
    assert files, f"no safetensors under {cache_root}"
    return files


@pytest.fixture(scope="module")
def dag_prepared(models, registry, tmp_path_factory) -> Path:
    """The DAG's demo preparation, step by step with its options: dataset at dog-v1 from the registry, then
    validate, caption, resize (64 px) and encode with the tiny model."""
    run = tmp_path_factory.mktemp("dag-run")
    dataset.run(dataset.DatasetConfig(repo=str(registry), path="dog", rev="dog-v1", output=str(run / "dataset")))
    validate.run(validate.ValidateConfig(input=str(run / "dataset" / "images"), output=str(run / "validated")))
    caption.run(caption.CaptionConfig(report=str(run / "validated"), output=str(run / "captions"),
                                      instance_prompt="a photo of sks dog"))
    resize.run(resize.ResizeConfig(captions=str(run / "captions"), output=str(run / "resized"), resolution=64))
    encode.run(encode.EncodeConfig(images=str(run / "resized"), output=str(run / "encoded"),
                                   base_model=models["sdxl"]))
    return run


def test_dvc_repro_reproduces_the_dag_preparation_and_then_skips(dag_prepared, models, tmp_path):
    repo = clean_copy(tmp_path / "clone")

    first = dvc(repo, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, first
    built = repo / "build"
    assert (built / "models" / "tiny-sdxl" / "model_index.json").is_file()
    assert (built / "models" / "evaluators" / "clip").is_dir() and (built / "models" / "evaluators" / "dino").is_dir()

    # The same bytes as the DAG's run: the offline model, the resized images and their manifest, the encode cache.
    assert content_hash(built / "models" / "tiny-sdxl") == content_hash(Path(models["sdxl"]))
    assert content_hash(built / "prepared" / "resized" / "images") == content_hash(dag_prepared / "resized" / "images")
    assert (built / "prepared" / "resized" / "manifest.json").read_bytes() == \
        (dag_prepared / "resized" / "manifest.json").read_bytes()
    assert tensor_files(built / "prepared" / "encoded") == tensor_files(dag_prepared / "encoded")

    # Outputs live in git-ignored build/: DVC adds no .gitignore entries; only dvc.lock is new (or updated).
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert {line[3:] for line in status.splitlines()} <= {"dvc.lock"}, status

    second = dvc(repo, "repro")
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second, second
    assert "Running stage" not in second
    assert "Data and pipelines are up to date." in dvc(repo, "status")

    # A changed param invalidates its stage (and so what comes after it), nothing before it.
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("resolution: 64", "resolution: 128", 1))
    changed = dvc(repo, "status")
    assert "resize:" in changed and "params.yaml" in changed, changed
    assert not any(f"{stage}:" in changed for stage in ("tiny-model", "validate", "caption")), changed
    assert "--resolution 128" in dvc(repo, "repro", "--dry")
