"""One GPU per local GPU step (plugins/dreamline/gpus.py): real flock leases, held by the step's own process."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from dreamline import gpus, operators
from dreamline.operators import LocalStepOperator


def test_leases_are_exclusive_and_all_or_nothing(tmp_path):
    devices = ("0", "1", "2")
    with gpus.lease(devices, 1, tmp_path) as (first, _), gpus.lease(devices, 1, tmp_path) as (second, _):
        assert first != second
        with gpus.lease(devices, 1, tmp_path) as (third, _):
            assert {*first, *second, *third} == set(devices)
        # two free devices are needed and one is: a two-GPU step takes none of them until both are free
        assert gpus._take(devices, 2, tmp_path) == []
    with pytest.raises(ValueError, match="needs 4 GPUs and DREAMLINE_GPU_DEVICES lists 3"):
        with gpus.lease(devices, 4, tmp_path):
            pass


def test_a_step_waits_for_a_free_gpu(tmp_path):
    said, got = [], []
    with gpus.lease(("0",), 1, tmp_path):
        waiter = threading.Thread(target=lambda: got.append(gpus.lease(("0",), 1, tmp_path, log=said.append)
                                                            .__enter__()[0]))
        waiter.start()
        time.sleep(1.5)
        assert got == [] and said == ["all 1 GPUs (0) are in use; waiting for 1"]
    waiter.join(timeout=10)
    assert got == [["0"]]


def test_the_steps_process_holds_its_gpu_after_the_operator_lets_go(tmp_path):
    """The lock is inherited: a step keeps its GPU even if the Airflow worker that leased it dies first."""
    with gpus.lease(("0",), 1, tmp_path) as (_, locks):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"], pass_fds=locks)
    assert gpus._take(("0",), 1, tmp_path) == []  # the worker closed its copy; the step still holds it
    child.wait()
    with gpus.lease(("0",), 1, tmp_path) as (devices, _):  # released by the kernel when the step ended
        assert devices == ["0"]


def test_a_gpu_step_sees_only_the_gpu_it_leased(tmp_path, home, monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (80, 80), (1, 2, 3)).save(images / "a.jpg")
    deployment = dataclasses.replace(operators.DEPLOYMENT, gpu_devices=("0", "1"), home=tmp_path / "home",
                                     storage=str(tmp_path / "runs"))
    monkeypatch.setattr(operators, "DEPLOYMENT", deployment)
    ti = SimpleNamespace(dag_id="lora_dog", task_id="evaluate", map_index=0, try_number=1)
    context = {"params": {}, "ti": ti, "run_id": "manual__1"}
    op = LocalStepOperator(task_id="evaluate", step="validate", profile="gpu",
                           options={"input": str(images), "output": str(tmp_path / "out")})
    with gpus.lease(("0", "1"), 1, deployment.home / "gpus") as (taken, _):  # another GPU step is running on 0
        op.execute(context)
    record = json.loads(next((tmp_path / "runs" / "lora_dog").glob("*/cost/evaluate.0.try-1.json")).read_text())
    assert taken == ["0"] and record["devices"] == "1"  # CUDA_VISIBLE_DEVICES, as the step saw it
    assert record["peak_rss_gb"] > 0  # its peak memory (on a GPU: peak_gpu_memory_gb and _reserved_gb instead)
    cpu = LocalStepOperator(task_id="validate", step="validate", options={"input": str(images),
                                                                         "output": str(tmp_path / "out2")})
    cpu.execute({**context, "ti": SimpleNamespace(**{**vars(ti), "task_id": "validate"})})
    record = json.loads(next((tmp_path / "runs" / "lora_dog").glob("*/cost/validate.0.try-1.json")).read_text())
    assert record["devices"] is None  # a CPU step leases nothing
