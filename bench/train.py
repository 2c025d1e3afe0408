"""Benchmark LoRA training: Dreamline's `train` on the encode cache against diffusers' DreamBooth-LoRA SDXL example
script, which VAE-encodes every image at every step, on the same model, images and settings, in one run.

    .venv/bin/python bench/train.py --reference PATH/train_dreambooth_lora_sdxl.py [--resolution 64] [--steps 10]
    .venv/bin/python bench/train.py --reference PATH/train_dreambooth_lora_sdxl.py --device cuda --grid

The reference script is not part of this repository: pass its path. It imports torchvision, which does not import
beside this venv's CPU torch, so it runs from a second venv (--reference-python, default $DREAMLINE_REFERENCE_PYTHON
or /tmp/refvenv/bin/python), e.g. `python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.14.1
torchvision==0.29.1 diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2`. It is started the way
docs/offline-models.md checked it: `accelerate launch` with one process.

Both sides get: the same base model (--model-size tiny: a random SDXL built here with `python -m sd_tasks
tiny-model`; full: SDXL-base's dimensions, random weights; or --base-model), the same images, resolution, batch size,
LoRA rank (on to_k/to_q/to_v/to_out.0, gaussian init), precision, gradient checkpointing, optimizer, seed 0, AdamW
at lr 1e-4 with weight decay 1e-2, a constant schedule, gradient clipping at 1.0, no checkpoint inside the measured
steps, and the same number of CPU threads (--threads, default all usable CPUs: OMP_NUM_THREADS for both, and
accelerate's --num_cpu_threads_per_process, without which `accelerate launch` may set its own). Ours also takes
--compile and --channels-last (sd_tasks/training/speedups.py); the reference has no such options. --recipe lean is the
memory-lean recipe: cached latents (ours always), bf16, gradient checkpointing, batch 1. --grid runs the GPU table of docs/benchmarks.md: batch 1 and 4, with and without gradient
checkpointing, and the lean recipe, at 1024 px in bf16 on the full-size model unless told otherwise.

Method (details in docs/benchmarks.md, "## Training"). Our preparation (validate -> caption -> resize -> encode) runs
first, a one-off cost reported apart. Each trainer runs for N and 2N steps, --repeat rounds, interleaved. Wall-clock
steps/s = N / (wall(2N) - wall(N)) and CPU seconds per step = (cpu(2N) - cpu(N)) / N, medians over rounds: start-up,
model loading and the final save cancel. The headline is the in-process median step time (ours from MLflow's
per-step loss timestamps, the reference from its progress bar). Peak memory: peak RSS on the CPU, the peak of
nvidia-smi's memory.used on CUDA. Model TFLOP/s: bench/flops.py's FLOPs per step x in-process steps/s; MFU (CUDA):
that / --peak-tflops.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.flops import H100_SXM_BF16_TFLOPS, mfu, unet_step_flops  # noqa: E402
from bench.measure import RunFailed, inner_rate, timed, write_probe  # noqa: E402

DEFAULT_IMAGES = REPO / "sample_data" / "dog"
DEFAULT_REFERENCE_PYTHON = "/tmp/refvenv/bin/python"
PROMPT = "a photo of sks dog"
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
SEED = 0
RECIPES = {"lean": {"batch_size": 1, "gradient_checkpointing": True, "mixed_precision": "bf16"}}
GRID = {"b1": {"batch_size": 1, "gradient_checkpointing": False},
        "b1-gc": {"batch_size": 1, "gradient_checkpointing": True},
        "b4": {"batch_size": 4, "gradient_checkpointing": False},
        "b4-gc": {"batch_size": 4, "gradient_checkpointing": True},
        "lean": {"recipe": "lean", **RECIPES["lean"]}}
GRID_DEFAULTS = {"resolution": 1024, "mixed_precision": "bf16", "model_size": "full", "steps": 20}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--reference-python", default=os.environ.get("DREAMLINE_REFERENCE_PYTHON",
                                                                     DEFAULT_REFERENCE_PYTHON),
                        help="python of the venv that runs the reference ($DREAMLINE_REFERENCE_PYTHON)")
    parser.add_argument("--base-model", help="SDXL pipeline folder (default: one built here, see --model-size)")
    parser.add_argument("--model-size", default="tiny", choices=["tiny", "full"],
                        help="the random SDXL built when --base-model is not given (full: SDXL-base's dimensions)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of subject images")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="N: each trainer runs N and 2N steps")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile of the UNet's repeated blocks")
    parser.add_argument("--channels-last", action="store_true", help="ours: the UNet in channels-last format")
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="a preset (flags given explicitly still win): "
                        + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    parser.add_argument("--grid", action="store_true", help=f"run the GPU grid {list(GRID)} (defaults then: "
                        f"{GRID_DEFAULTS}); one table at the end")
    parser.add_argument("--rows", help=f"with --grid: only these rows, comma-separated, of {','.join(GRID)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads per trainer (OMP_NUM_THREADS; accelerate's --num_cpu_threads_per_process)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (N, 2N) runs per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the in-process median")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="first run each trainer once for 2 steps, untimed (a cold first start is slower)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                        help="accelerator peak dense TFLOP/s at the training precision, for MFU (default: H100 SXM "
                             "bf16; H100 PCIe 756, A100 312)")
    parser.add_argument("--keep", type=Path, help="keep the work folder (models, cache, logs) here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, over the defaults of --grid and --recipe (explicit flags win), checked."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.grid:
        parser.set_defaults(**GRID_DEFAULTS)
    if first.recipe:
        parser.set_defaults(**RECIPES[first.recipe])
    args = parser.parse_args(argv)
    args.rows = args.rows.split(",") if args.rows else list(GRID)
    if args.grid and set(args.rows) - set(GRID):
        parser.error(f"--rows {','.join(args.rows)}: choose from {','.join(GRID)}")
    if args.reference is None:
        parser.error("--reference PATH is required (diffusers' train_dreambooth_lora_sdxl.py)")
    if not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file")
    if not Path(args.reference_python).exists():
        parser.error(f"--reference-python {args.reference_python}: no such file (see the module docstring)")
    if args.device == "cuda" and shutil.which("nvidia-smi") is None:
        parser.error("--device cuda needs nvidia-smi")
    return args


def row_args(args: argparse.Namespace, row: str) -> argparse.Namespace:
    """`args` with a grid row's settings."""
    settings = dict(GRID[row])
    return argparse.Namespace(**{**vars(args), "recipe": None, **settings})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine()}")
    print(f"code: {code_version()}")
    print(f"load average at start: {load()}")
    work = Path(tempfile.mkdtemp(prefix="dreamline-bench-train-"))
    try:
        env = child_env(args, work)
        model = args.base_model
        if model is None:
            model = str(work / f"sdxl-{args.model_size}")
            started = time.perf_counter()
            step(env, "tiny-model", model, "--size", args.model_size)
            print(f"built the {args.model_size} random SDXL in {time.perf_counter() - started:.0f} s")
        prep = prepare(args, env, work, model)
        print("preparation (one-off, not in steps/s): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in prep["seconds"].items()))
        rows = [(row, row_args(args, row)) for row in args.rows] if args.grid else [("", args)]
        results = {}
        for i, (row, row_settings) in enumerate(rows):
            try:
                results[row] = compare(row_settings, env, work / (row or "run"), model, prep,
                                       warm_up=args.warm_up and i == 0)
            except RunFailed as failed:
                if not args.grid:
                    raise SystemExit(str(failed)) from None
                results[row] = {"failed": str(failed).strip().splitlines()[-1][:200]}
                print(f"row {row} failed: {results[row]['failed']}", flush=True)
        if args.grid:
            grid_table(args, results)
        print(json.dumps({"settings": vars(args) | {"base_model": model}, "machine": machine(),
                          "code": code_version(), "prep_seconds": prep["seconds"], "results": results}, default=str))
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def compare(args, env: dict, work: Path, model: str, prep: dict, warm_up: bool) -> dict:
    """Both trainers, N and 2N steps, --repeat rounds; their figures, printed."""
    print(f"\nsettings: {settings(args)}", flush=True)
    sides = {"ours": lambda steps, out: train_ours(args, env, prep["cache"], model, steps, out),
             "reference": lambda steps, out: train_reference(args, env, model, steps, out)}
    for side in sides if warm_up else ():  # untimed: page cache, .pyc files, allocator
        sides[side](2, work / f"warm-{side}")
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeat):
        for steps in (args.steps, 2 * args.steps):
            for side, train in sides.items():
                result = train(steps, work / f"{side}-{steps}-{r}")
                runs.setdefault((side, steps), []).append(result)
                print(f"  {side:9s} {steps:4d} steps: {result['wall_s']:7.2f} s wall, {result['cpu_s']:7.2f} CPU-s, "
                      f"{result['threads']} threads, peak {result['peak_mib']:.0f} MiB, load {load()}", flush=True)
    figures = {side: summarise(args, runs[(side, args.steps)], runs[(side, 2 * args.steps)]) for side in sides}
    flops = unet_step_flops(model, args.batch_size, args.resolution, args.rank)  # shapes only: seconds
    for f in figures.values():
        rate = f["inner_steps_per_s"] or f["steps_per_s"]
        f |= {"flops_per_step": flops, "model_tflops_per_s": flops * rate / 1e12}
        if args.device == "cuda":  # the peak is an accelerator's
            f["mfu"] = mfu(flops, 1 / rate, args.peak_tflops)
    print(f"UNet + LoRA forward + backward: {flops / 1e9:.3g} GFLOP per step (batch {args.batch_size})")
    report(args, figures, prep)
    return figures


def settings(args) -> str:
    return (f"{args.resolution} px, batch {args.batch_size}, rank {args.rank}, precision {args.mixed_precision}, "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, AdamW"
            + (", ours compiled" if args.compile else "") + (", ours channels-last" if args.channels_last else "")
            + f", {args.device}, {args.threads} threads, {args.steps} and {2 * args.steps} steps, repeat {args.repeat}")


# ---- our side ----------------------------------------------------------------------------------------------------

def child_env(args, work: Path) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    probe = write_probe(work / "probe")  # each run's torch threads (bench/measure.py)
    env |= {"DREAMLINE_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(probe), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def step(env: dict, name: str, *argv: str) -> tuple[dict, float]:
    """`python -m sd_tasks <name> ...` in our venv; (its JSON result, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sd_tasks", name, *argv], env=env, cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def prepare(args, env: dict, work: Path, model: str) -> dict:
    seconds = {}
    _, seconds["validate"] = step(env, "validate", "--input", str(args.images.resolve()),
                                  "--output", str(work / "validated"))
    _, seconds["caption"] = step(env, "caption", "--report", str(work / "validated"), "--output",
                                 str(work / "captioned"), "--instance-prompt", PROMPT)
    resized, seconds["resize"] = step(env, "resize", "--captions", str(work / "captioned"), "--output",
                                      str(work / "resized"), "--resolution", str(args.resolution),
                                      "--max-aspect-ratio", "1")
    encoded, seconds["encode"] = step(env, "encode", "--images", str(work / "resized"), "--output",
                                      str(work / "cache"), "--base-model", model)
    print(f"prepared {resized['images']} images into buckets {resized['buckets']}; cache {encoded['cache']}")
    return {"cache": encoded["cache"], "seconds": seconds}


def train_ours(args, env: dict, cache: str, model: str, steps: int, out: Path) -> dict:
    experiment = f"bench-{out.parent.name}-{out.name}"  # one MLflow run per benchmark run
    cmd = [sys.executable, "-m", "sd_tasks", "train", "--cache", cache, "--output", str(out), "--base-model", model,
           "--learning-rate", str(LEARNING_RATE), "--max-steps", str(steps), "--checkpointing-steps", str(steps),
           "--rank", str(args.rank), "--batch-size", str(args.batch_size), "--lr-scheduler", "constant",
           "--lr-warmup-steps", "0", "--weight-decay", str(WEIGHT_DECAY), "--max-grad-norm", "1.0",
           "--mixed-precision", args.mixed_precision, "--seed", str(SEED),
           "--experiment", experiment,
           "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
           "--compile" if args.compile else "--no-compile",
           "--channels-last" if args.channels_last else "--no-channels-last"]
    result = timed(cmd, env, out, args.device)
    run_id = json.loads(result["stdout"].strip().splitlines()[-1])["run_id"]
    stamps, metrics = mlflow_steps(env, run_id)
    result |= {"step_times": stamps, "inner": metrics}
    return result


def mlflow_steps(env: dict, run_id: str) -> tuple[dict[int, float], dict]:
    """Per-step wall-clock seconds of the `loss` metric, and the run's final metrics."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path(env['DREAMLINE_HOME']) / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss")
    return {m.step: m.timestamp / 1000 for m in history}, dict(client.get_run(run_id).data.metrics)


# ---- the reference -----------------------------------------------------------------------------------------------

def reference_command(args, model: str, steps: int, out: Path) -> list[str]:
    launch = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", str(args.threads)]
    if args.device == "cpu":
        launch.append("--cpu")
    cmd = [args.reference_python, *launch, str(args.reference.resolve()),
           "--pretrained_model_name_or_path", model, "--instance_data_dir", str(args.images.resolve()),
           "--instance_prompt", PROMPT, "--resolution", str(args.resolution), "--center_crop",
           "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
           "--checkpointing_steps", str(steps + 1), "--rank", str(args.rank), "--learning_rate", str(LEARNING_RATE),
           "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--adam_weight_decay", str(WEIGHT_DECAY),
           "--max_grad_norm", "1.0", "--output_dir", str(out), "--seed", str(SEED),
           "--mixed_precision", args.mixed_precision]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    return cmd


def train_reference(args, env: dict, model: str, steps: int, out: Path) -> dict:
    probe = env["PYTHONPATH"].split(os.pathsep)[0]  # the probe, not our package, in its venv
    result = timed(reference_command(args, model, steps, out), env | {"PYTHONPATH": probe}, out, args.device)
    result["inner"] = {}
    return result


# ---- figures -----------------------------------------------------------------------------------------------------

def summarise(args, short: list[dict], long: list[dict]) -> dict:
    """Per round, the difference between the 2N- and the N-step run (minutes apart at most); medians over rounds.
    In-process steps/s from the per-step stamps of all runs."""
    per_step = statistics.median((b["wall_s"] - a["wall_s"]) / args.steps for a, b in zip(short, long))
    cpu_per_step = statistics.median((b["cpu_s"] - a["cpu_s"]) / args.steps for a, b in zip(short, long))
    fast_short, fast_long = min(short, key=lambda r: r["wall_s"]), min(long, key=lambda r: r["wall_s"])
    figures = {"steps_per_s": 1 / per_step if per_step > 0 else float("nan"), "s_per_step": per_step,
               "cpu_s_per_step": cpu_per_step, "cores_busy": cpu_per_step / per_step if per_step > 0 else None,
               "threads": sorted({r["threads"] for r in short + long}, key=str),
               "wall_short_s": fast_short["wall_s"], "wall_long_s": fast_long["wall_s"],
               "peak_mib": max(r["peak_mib"] for r in short + long),
               "inner_steps_per_s": inner_rate([r["step_times"] for r in short + long], args.warmup)}
    inner = fast_long.get("inner") or {}
    if "peak_gpu_memory_gb" in inner:
        figures["torch_peak_allocated_mib"] = inner["peak_gpu_memory_gb"] * 1024
    return figures


def report(args, figures: dict, prep: dict) -> None:
    ours, ref = figures["ours"], figures["reference"]
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"load average at the end: {load()}")
    print(f"\n{'':28s} {'in-process steps/s':>18s} {'wall steps/s':>12s} {'CPU-s/step':>10s} {'cores':>5s} "
          f"{'threads':>7s} {memory:>12s} {'TFLOP/s':>8s}" + (f" {'MFU':>6s}" if "mfu" in ours else ""))
    for name, f in (("dreamline (encode cache)", ours), ("reference (VAE every step)", ref)):
        inner = f"{f['inner_steps_per_s']:.2f}" if f["inner_steps_per_s"] else "-"
        cores = f"{f['cores_busy']:.2f}" if f["cores_busy"] else "-"
        print(f"{name:28s} {inner:>18s} {f['steps_per_s']:12.2f} {f['cpu_s_per_step']:10.3f} {cores:>5s} "
              f"{','.join(map(str, f['threads'])):>7s} {f['peak_mib']:12.0f} {f['model_tflops_per_s']:8.3g}"
              + (f" {f['mfu']:6.1%}" if "mfu" in f else ""))
    if "torch_peak_allocated_mib" in ours:
        print(f"dreamline torch.cuda.max_memory_allocated: {ours['torch_peak_allocated_mib']:.0f} MiB")
    if ours["inner_steps_per_s"] and ref["inner_steps_per_s"]:
        print(f"steps/s ratio (dreamline / reference), in-process median: "
              f"{ours['inner_steps_per_s'] / ref['inner_steps_per_s']:.2f}x")
    print(f"steps/s ratio (dreamline / reference), wall clock N vs 2N: {ours['steps_per_s'] / ref['steps_per_s']:.2f}x")
    print(f"CPU-s per step ratio (dreamline / reference): {ours['cpu_s_per_step'] / ref['cpu_s_per_step']:.2f}")
    print(f"peak memory ratio (dreamline / reference): {ours['peak_mib'] / ref['peak_mib']:.2f}")
    if min(ours["s_per_step"], ref["s_per_step"]) <= 0:
        print("warning: wall(2N) <= wall(N): start-up noise swamps N steps here; raise --steps or --repeat")
        return
    saving = ref["s_per_step"] - ours["s_per_step"]
    payback = f"; encode is paid back after {prep['seconds']['encode'] / saving:.0f} steps" if saving > 0 else ""
    print(f"one-off encode: {prep['seconds']['encode']:.1f} s = {prep['seconds']['encode'] / ours['s_per_step']:.0f} "
          f"of our steps; a steady-state step saves {saving:.3f} s{payback}")


def grid_table(args, results: dict) -> None:
    """docs/benchmarks.md's GPU table, filled in."""
    print(f"\n| row | trainer | steps/s (in-process) | steps/s (wall) | peak {'GPU' if args.device == 'cuda' else 'RSS'}"
          f" MiB | model TFLOP/s | MFU | ours / reference steps/s | ours / reference memory |\n|" + " --- |" * 9)
    for row, figures in results.items():
        if "failed" in figures:
            print(f"| {row} | both | failed: {figures['failed']} | | | | | | |")
            continue
        ours, ref = figures["ours"], figures["reference"]
        speed = (ours["inner_steps_per_s"] or ours["steps_per_s"]) / (ref["inner_steps_per_s"] or ref["steps_per_s"])
        for name, f in (("dreamline", ours), ("reference", ref)):
            inner = f"{f['inner_steps_per_s']:.2f}" if f["inner_steps_per_s"] else "-"
            utilisation = f"{f['mfu']:.1%}" if "mfu" in f else "-"
            ratios = f"{speed:.2f}x | {ours['peak_mib'] / ref['peak_mib']:.2f}" if name == "dreamline" else " | "
            print(f"| {row} | {name} | {inner} | {f['steps_per_s']:.2f} | {f['peak_mib']:.0f} | "
                  f"{f['model_tflops_per_s']:.3g} | {utilisation} | {ratios} |")


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpus} CPUs ({os.cpu_count()} online), {model}, Python {platform.python_version()}"


def code_version() -> str:
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sd_tasks", "bench")
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
