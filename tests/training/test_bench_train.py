"""bench/train.py's own machinery, without training: both trainers get the threads asked for (ours through
OMP_NUM_THREADS, the reference through `accelerate launch`), what a run's CPU time and progress stamps are, the
CPU-seconds per step, and the presets (--recipe lean, --grid) that the GPU runs rely on."""
from __future__ import annotations

import argparse
import sys
import textwrap

import pytest

from bench import train as bench
from bench.measure import timed

STUB = textwrap.dedent('''\
    """Stands in for diffusers' script: torch, some CPU work, and its progress bar's lines on stderr."""
    import sys, time
    import torch
    steps = int(sys.argv[sys.argv.index("--max_train_steps") + 1])
    a = torch.randn(256, 256)
    for k in range(1, steps + 1):
        deadline = time.process_time() + 0.1
        while time.process_time() < deadline:
            a = torch.tanh(a @ a)
        print(f"Steps: {100 * k // steps}%|##| {k}/{steps} [00:01<00:00, loss=0.1]", file=sys.stderr, flush=True)
''')


@pytest.fixture
def args(tmp_path):
    stub = tmp_path / "train_dreambooth_lora_sdxl.py"
    stub.write_text(STUB)
    return bench.parse_args(["--reference", str(stub), "--reference-python", sys.executable, "--threads", "1"])


def test_both_trainers_get_the_threads_asked_for(args, tmp_path):
    """One thread on this (at least) 2-CPU machine, where `accelerate launch --cpu` alone would pick one per core."""
    env = bench.child_env(args, tmp_path)
    assert env["OMP_NUM_THREADS"] == "1"
    ours = timed([sys.executable, "-c", "import torch"], env, tmp_path / "ours", "cpu")
    assert ours["threads"] == 1

    without_omp = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # the launcher's flag alone
    reference = bench.train_reference(args, without_omp, "model", 3, tmp_path / "reference")
    assert reference["threads"] == 1
    launched = {p["argv0"].rsplit("/", 1)[-1] for p in reference["processes"]}
    assert launched == {"launch.py", "train_dreambooth_lora_sdxl.py"}
    script = next(p for p in reference["processes"] if p["argv0"].endswith("train_dreambooth_lora_sdxl.py"))
    assert reference["threads"] == script["threads"]  # the script's, even when the launcher used more CPU
    assert sorted(reference["step_times"]) == [1, 2, 3]
    assert reference["cpu_s"] >= 0.3  # the script's three 0.1 CPU-s steps, in the process tree's rusage


def test_cpu_seconds_per_step_is_the_difference_between_the_2n_and_the_n_step_runs(args):
    args.steps = 10
    short = [{"wall_s": 20.0, "cpu_s": 30.0, "threads": 2, "peak_mib": 600, "step_times": {}},
             {"wall_s": 22.0, "cpu_s": 31.0, "threads": 2, "peak_mib": 610, "step_times": {}}]
    long = [{"wall_s": 25.0, "cpu_s": 40.0, "threads": 2, "peak_mib": 620, "step_times": {}},
            {"wall_s": 26.0, "cpu_s": 39.0, "threads": 2, "peak_mib": 615, "step_times": {}}]
    figures = bench.summarise(args, short, long)
    assert figures["cpu_s_per_step"] == pytest.approx(0.9)  # the median of 1.0 and 0.8 CPU-s per step
    assert figures["s_per_step"] == pytest.approx(0.45)
    assert figures["cores_busy"] == pytest.approx(2.0)
    assert figures["threads"] == [2] and figures["peak_mib"] == 620


def test_the_lean_recipe_and_the_grid(args):
    reference, python = str(args.reference), sys.executable
    base = ["--reference", reference, "--reference-python", python]

    lean = bench.parse_args([*base, "--recipe", "lean"])
    assert (lean.batch_size, lean.gradient_checkpointing, lean.mixed_precision) == (1, True, "bf16")
    assert bench.parse_args([*base, "--recipe", "lean", "--batch-size", "2"]).batch_size == 2  # flags win
    cuda = argparse.Namespace(**{**vars(lean), "device": "cuda"})
    # both trainers with plain AdamW: 8-bit AdamW would save tens of MB of a LoRA's optimizer state
    assert "--use_8bit_adam" not in bench.reference_command(bench.row_args(cuda, "lean"), "m", 2, args.reference)

    grid = bench.parse_args([*base, "--grid"])
    assert (grid.resolution, grid.mixed_precision, grid.model_size, grid.rows) == (
        1024, "bf16", "full", ["b1", "b1-gc", "b4", "b4-gc", "lean"])
    rows = {row: bench.row_args(grid, row) for row in grid.rows}
    assert [(r.batch_size, r.gradient_checkpointing) for r in rows.values()] == [
        (1, False), (1, True), (4, False), (4, True), (1, True)]
    assert bench.parse_args([*base, "--grid", "--resolution", "64", "--rows", "b1,lean"]).resolution == 64


@pytest.mark.parametrize("flags, message", [
    (["--grid", "--rows", "b1,b9"], "choose from b1,b1-gc,b4,b4-gc,lean"),
])
def test_bad_flags_are_one_clear_line(args, flags, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--reference", str(args.reference), "--reference-python", sys.executable, *flags])
    assert message in capsys.readouterr().err
