"""Faults: every step killed with SIGKILL in the middle of its work, from outside, at a moment seen from outside (its
staging folder appears, a checkpoint appears, its model version lands in MLflow's store), then run again. The rerun
must end with the same files as a clean run (by hash), the same metrics, one MLflow run per logical run and every
step's loss once; nothing half-written is ever taken for whole. Each step runs as a real `python -m sd_tasks`
subprocess on the tiny fixtures; the clean references are the session's `prepared` folders or runs made here.

Files left out of the hash comparison because they hold wall-clock times or run ids: checkpoint `dreamline.json`
(train_seconds, run_id) with the completion marker that lists its size, and evaluate's `metrics.json` (run_id; its
numbers are compared instead). The training state (safetensors and JSON) is compared byte for byte.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO
from dreamline.operators import step_argv
from sd_tasks.core import storage, tracking
from sd_tasks.training import train

pytestmark = pytest.mark.reliability

PROMPTS = ["a sks dog in the snow", "a red sks dog"]
STEPS_TRAINED = 4
# train_seconds and run_id; the marker holds that file's size
WALL_CLOCK = (train.CHECKPOINT_INFO, storage.MARKER)


def hashes(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): content_hash(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in leave_out}


def content_hash(path: Path) -> str:
    """sha256 of the bytes; of a .safetensors file, of its header's content and its data bytes: safetensors writes
    the header's metadata in the order of a Rust HashMap, which changes from process to process."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        size = struct.unpack("<Q", data[:8])[0]
        header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True).encode()
        data = header + data[8 + size:]
    return hashlib.sha256(data).hexdigest()


class NewStaging:
    """True once a writer's staging folder (`.<name>.staging-*`) that was not there at `start()` exists anywhere under
    `folder` (with `of`: the staging folder of the output `folder/of`, looked for among folder's own entries, fast
    enough for a writer that takes milliseconds). A killed writer leaves its staging folder behind, and that one
    must not count for the next try."""

    def __init__(self, folder: Path, of: str | None = None):
        self.folder, self.of, self.before = folder, of, set()

    def _found(self) -> set[str]:
        try:
            if self.of:
                return {name for name in os.listdir(self.folder) if name.startswith(f".{self.of}{storage.STAGING}")}
            return {os.path.join(top, name) for top, dirs, _ in os.walk(self.folder)
                    for name in dirs if storage.STAGING in name}
        except OSError:
            return set()

    def start(self) -> None:
        self.before = self._found()

    def __call__(self) -> bool:
        return bool(self._found() - self.before)


def sd_tasks(step: str, options: dict) -> list[str]:
    return [sys.executable, "-m", "sd_tasks", *step_argv(step, options)]


def kill_midway(argv: list[str], mid_work: Callable[[], bool], clean: Callable[[], None] = lambda: None,
                landed: Callable[[], bool] = lambda: False, attempts: int = 8, timeout: float = 300,
                poll: float = 0.0005) -> int:
    """Start the step and SIGKILL it as soon as `mid_work()` holds; return the attempt that was killed. A step that
    ends before the moment is seen, or whose output has `landed()` by the time the signal arrives (the moment can
    pass between seeing it and the kill: a small folder's rename takes microseconds), is cleaned and started again.
    `poll=0` watches without pausing, for moments of microseconds."""
    for attempt in range(1, attempts + 1):
        if hasattr(mid_work, "start"):  # a NewStaging watcher: what is there now does not count
            mid_work.start()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not mid_work() and time.monotonic() < deadline:
            time.sleep(poll)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if alive and not landed():
            return attempt
        clean()
    pytest.fail(f"{argv[3]} always ended before the moment to kill it was seen ({attempts} tries)")


def rerun(argv: list[str]) -> dict:
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def not_taken_for_whole(folder: Path) -> None:
    """After a kill, the output is either absent, or not whole, or whole and matching its marker."""
    if folder.exists() and (folder / storage.MARKER).exists():
        assert storage.is_whole(str(folder)), storage.why_not_whole(str(folder))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("step", ["dataset", "validate", "caption", "resize"])
def test_a_light_step_killed_mid_write_reruns_to_the_same_files(step, prepared, registry, workdir, figures):
    out = workdir / step
    options, reference = {
        "dataset": ({"repo": str(registry), "path": "dog", "rev": "dog-v1"}, prepared / "dataset"),
        "validate": ({"input": str(prepared / "dataset" / "images")}, prepared / "validated"),
        "caption": ({"report": str(prepared / "validated"), "instance_prompt": "a photo of sks dog"},
                    prepared / "captions"),
        "resize": ({"captions": str(prepared / "captions"), "resolution": 64}, prepared / "resized"),
    }[step]
    argv = sd_tasks(step, {**options, "output": str(out)})
    started = time.monotonic()
    attempt = kill_midway(argv, NewStaging(workdir, of=step), clean=lambda: storage.remove(str(out)),
                          landed=lambda: storage.is_whole(str(out)), attempts=30, poll=0)
    assert not storage.is_whole(str(out)), "a killed writer left a folder that reads as whole"
    rerun(argv)
    assert hashes(out) == hashes(reference)
    assert not NewStaging(out)() and not NewStaging(workdir, of=step)(), "the killed writer's staging folder is gone"
    figures.record("fault", f"{step} killed mid-write", f"rerun wrote the same files (killed on try {attempt})",
                   lost=0, seconds=round(time.monotonic() - started, 1))


def test_encode_and_merge_killed_mid_write_rerun_to_the_same_cache(prepared, cache, models, workdir, figures):
    started = time.monotonic()
    out = workdir / "encode"
    argv = sd_tasks("encode", {"images": str(prepared / "resized"), "output": str(out), "base_model": models["sdxl"]})
    key = Path(cache).name
    shard = out / key / "shard-00000-of-00001"
    kill_midway(argv, NewStaging(out), clean=lambda: storage.remove(str(out)),
                landed=lambda: storage.is_whole(str(shard)))
    assert not storage.is_whole(str(shard))
    assert rerun(argv)["cache"] == str(out / key)
    assert hashes(out / key) == hashes(Path(cache))

    # sharded: merge-cache writes one file (a rename), killed while its temporary file exists
    sharded = workdir / "sharded"
    for index in (0, 1):
        rerun(sd_tasks("encode", {"images": str(prepared / "resized"), "output": str(sharded),
                                  "base_model": models["sdxl"], "shard_index": index, "num_shards": 2}))
    merge = sd_tasks("merge-cache", {"cache": str(sharded / key), "num_shards": 2})

    def temporary_manifest() -> bool:
        return any(name.startswith(".manifest.json.") for name in os.listdir(sharded / key))

    attempt = kill_midway(merge, temporary_manifest, clean=lambda: (sharded / key / "manifest.json").unlink(),
                          attempts=60, poll=0)
    manifest = sharded / key / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["records"]  # never a torn file
    assert rerun(merge)["records"] == 5
    merged, whole = (json.loads(p.read_text()) for p in (manifest, Path(cache) / "manifest.json"))
    assert [{k: v for k, v in r.items() if k != "shard"} for r in merged["records"]] == \
        [{k: v for k, v in r.items() if k != "shard"} for r in whole["records"]]
    figures.record("fault", "encode and merge-cache killed mid-write",
                   f"the same cache files after the rerun; merge killed on try {attempt}", lost=0,
                   seconds=round(time.monotonic() - started, 1))


def test_class_images_killed_mid_generation_rerun_to_the_same_images(models, workdir, figures):
    from sd_tasks.data import class_images

    started = time.monotonic()
    options = {"base_model": models["sdxl"], "class_prompt": "a photo of dog", "count": 2, "resolution": 64,
               "num_inference_steps": 2}
    reference = class_images.run(class_images.ClassImagesConfig(output=str(workdir / "class-ref"), **options))
    out = workdir / "class"
    argv = sd_tasks("class-images", {**options, "output": str(out)})
    kill_midway(argv, NewStaging(out), clean=lambda: storage.remove(str(out)),
                landed=lambda: storage.is_whole(str(out / reference["key"])))
    assert not storage.is_whole(str(out / reference["key"]))
    result = rerun(argv)
    assert not result["cached"]  # the killed attempt's folder was not taken for a cached one
    assert hashes(out / reference["key"]) == hashes(Path(reference["images"]))
    figures.record("fault", "class-images killed mid-generation", "rerun generated the same images", lost=0,
                   seconds=round(time.monotonic() - started, 1))


def train_options(cache: str, models: dict, output: Path, experiment: str) -> dict:
    return {"cache": cache, "output": str(output), "base_model": models["sdxl"], "learning_rate": 1e-3,
            "max_steps": STEPS_TRAINED, "checkpointing_steps": 2, "experiment": experiment}


@pytest.fixture(scope="module")
def trained(cache, models, workdir) -> Path:
    """The clean reference training run."""
    out = workdir / "train-ref"
    train.run(train.TrainConfig(**train_options(cache, models, out, "faults-ref")))
    return out


def runs_keyed(experiment: str, output: Path) -> list:
    client = tracking.client()
    return client.search_runs([tracking.experiment_id(experiment)],
                              filter_string=f"tags.`{tracking.RUN_KEY}` = 'standalone:{output}'")


def test_train_killed_mid_checkpoint_and_after_one_resumes_to_the_same_weights_and_losses(cache, models, workdir,
                                                                                         trained, figures):
    started = time.monotonic()
    out = workdir / "train"
    argv = sd_tasks("train", train_options(cache, models, out, "faults"))
    kill_midway(argv, NewStaging(out), clean=lambda: storage.remove(str(out)),  # while checkpoint-2 is written
                landed=lambda: bool(train.list_checkpoints(str(out))))
    assert train.list_checkpoints(str(out)) == []

    def checkpoint_2_whole() -> bool:
        return storage.is_whole(str(out / "checkpoint-2"))

    kill_midway(argv, checkpoint_2_whole, clean=lambda: storage.remove(str(out)),  # as soon as checkpoint-2 is whole
                landed=lambda: storage.is_whole(str(out / "checkpoint-4")))
    assert [c["step"] for c in train.list_checkpoints(str(out))] == [2]
    result = rerun(argv)
    assert result["resumed_from"] == 2
    for step in (2, 4):
        assert hashes(out / f"checkpoint-{step}", leave_out=WALL_CLOCK) == \
            hashes(trained / f"checkpoint-{step}", leave_out=WALL_CLOCK)
    runs = runs_keyed("faults", out)
    assert len(runs) == 1, "one MLflow run per training run"
    history = tracking.client().get_metric_history(runs[0].info.run_id, "loss")
    reference = tracking.client().get_metric_history(runs_keyed("faults-ref", trained)[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS_TRAINED + 1)), "every step's loss exactly once"
    assert {m.step: m.value for m in history} == {m.step: m.value for m in reference}
    figures.record("fault", "train killed mid-checkpoint, then right after one",
                   "resumed to the same weights; one MLflow run, every step's loss once", lost=0,
                   seconds=round(time.monotonic() - started, 1))


def suite(prepared: Path, models: dict) -> dict:
    return {"instance_images": str(prepared / "resized"), "prompts": PROMPTS, "clip_model": models["clip"],
            "dino_model": models["dino"], "images_per_prompt": 1, "num_inference_steps": 2}


def same_evaluation(folder: Path, reference: Path) -> None:
    """The same images (by hash) and the same metrics.json numbers; its run_id may differ."""
    assert hashes(folder / "images") == hashes(reference / "images")
    one, other = (json.loads((f / "metrics.json").read_text()) for f in (folder, reference))
    assert {k: v for k, v in one.items() if k != "checkpoint"} == {k: v for k, v in other.items() if k != "checkpoint"}


def test_evaluate_killed_mid_write_and_per_run_killed_between_checkpoints_rerun_to_the_same_scores(
        prepared, models, trained, workdir, figures):
    from sd_tasks.evaluation import evaluate

    started = time.monotonic()
    evaluations = workdir / "evaluations"
    reference = workdir / "eval-ref" / "step-4"
    evaluate.run(evaluate.EvaluateConfig(checkpoint=str(trained / "checkpoint-4"), output=str(reference),
                                         **suite(prepared, models)))
    out = workdir / "eval-one" / "step-4"
    argv = sd_tasks("evaluate", {"checkpoint": str(trained / "checkpoint-4"), "output": str(out),
                                 **suite(prepared, models)})
    attempt = kill_midway(argv, NewStaging(out.parent, of=out.name), clean=lambda: storage.remove(str(out)),
                          landed=lambda: storage.is_whole(str(out)), attempts=30, poll=0)  # a moment: small images
    assert not storage.is_whole(str(out))
    rerun(argv)
    same_evaluation(out, reference)

    per_run = evaluations / "lr-1e-3"
    argv = sd_tasks("evaluate", {"training_run": str(trained), "output": str(per_run), **suite(prepared, models)})
    kill_midway(argv, lambda: storage.is_whole(str(per_run / "step-2")), clean=lambda: storage.remove(str(per_run)),
                landed=lambda: storage.is_whole(str(per_run / "step-4")))
    assert not storage.is_whole(str(per_run / "step-4"))
    result = rerun(argv)
    assert [e.get("done", False) for e in result["evaluations"]] == [True, False]  # step-2 was whole: kept
    same_evaluation(per_run / "step-4", reference)
    training_run_id = json.loads((trained / "checkpoint-4" / train.CHECKPOINT_INFO).read_text())["run_id"]
    history = tracking.client().get_metric_history(training_run_id, "eval/dino")
    assert sorted(m.step for m in history) == [2, 4], "each checkpoint's scores once on its training run"
    figures.record("fault", "evaluate killed mid-write; --training-run killed between checkpoints",
                   "the same images and scores after the rerun, the whole step-2 kept, each score logged once "
                   f"(killed mid-write on try {attempt})",
                   lost=0, seconds=round(time.monotonic() - started, 1))


def test_select_and_register_killed_mid_work_rerun_to_one_selection_and_one_version(
        prepared, models, workdir, figures):
    from sd_tasks.evaluation import evaluate, select

    started = time.monotonic()
    evaluations = workdir / "evaluations"
    assert storage.is_whole(str(evaluations / "lr-1e-3" / "step-4")), "runs after the evaluate scenario"
    evaluate.run(evaluate.EvaluateConfig(base_model=models["sdxl"], output=str(evaluations / "base"),
                                         **suite(prepared, models)))
    reference = workdir / "select-ref"
    select.run(select.SelectConfig(evaluations=str(evaluations), output=str(reference)))
    out = workdir / "select"
    argv = sd_tasks("select", {"evaluations": str(evaluations), "output": str(out)})
    kill_midway(argv, NewStaging(workdir, of=out.name), clean=lambda: storage.remove(str(out)),
                landed=lambda: storage.is_whole(str(out)), attempts=30, poll=0)
    rerun(argv)
    assert hashes(out) == hashes(reference)

    parent = tracking.run(tracking.StartRunConfig(experiment="faults", run_key="faults/register"))["run_id"]
    database = Path(tracking.tracking_uri().removeprefix("sqlite:///"))

    def version_registered() -> bool:
        with contextlib.closing(sqlite3.connect(database, timeout=0.1)) as db:
            try:
                return bool(db.execute("SELECT count(*) FROM model_versions WHERE name = 'faults-lora'").fetchone()[0])
            except sqlite3.OperationalError:  # locked by the writer, or no table yet
                return False

    argv = sd_tasks("register", {"selection": str(out), "dataset": str(prepared / "dataset"),
                                 "model_name": "faults-lora", "output": str(workdir / "register"),
                                 "parent_run_id": parent, "margin": -10})
    def start_over() -> None:  # it registered and published before the kill landed
        tracking.client().delete_registered_model("faults-lora")
        storage.remove(str(workdir / "register"))

    attempt = kill_midway(argv, version_registered, clean=start_over,
                          landed=lambda: storage.is_whole(str(workdir / "register")))
    assert not storage.is_whole(str(workdir / "register"))
    result = rerun(argv)
    client = tracking.client()
    versions = client.search_model_versions("name = 'faults-lora'")
    assert [str(v.version) for v in versions] == ["1"], "one model version per pipeline run"
    assert result["version"] == 1 and "challenger" in result["aliases"]
    assert versions[0].tags[tracking.RUN_KEY] == parent and versions[0].tags["step"] == str(result["step"])
    assert client.get_run(parent).info.status == "FINISHED"
    figures.record("fault", "select killed mid-write; register killed once its version existed",
                   f"the same selection; one model version with its lineage tags (register killed on try {attempt})",
                   lost=0,
                   seconds=round(time.monotonic() - started, 1))
