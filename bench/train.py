"""Benchmark LoRA training: Dreamline's `train` on the encode cache against diffusers' DreamBooth-LoRA SDXL example
script, which VAE-encodes every image at every step, on the same model, images and settings, in one run.

    .venv/bin/python bench/train.py --reference PATH/train_dreambooth_lora_sdxl.py [--resolution 64] [--steps 10]

The reference script is not part of this repository: pass its path. It imports torchvision, which does not import
beside this venv's CPU torch, so it runs from a second venv (--reference-python, default $DREAMLINE_REFERENCE_PYTHON
or /tmp/refvenv/bin/python), e.g. `python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.14.1
torchvision==0.29.1 diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2`. It is started the way
docs/offline-models.md checked it: `accelerate launch` with one process.

Both sides get: the same base model (default: a tiny random SDXL built here with `python -m sd_tasks tiny-model`;
pass a `--size full` one for GPU runs), the same images, resolution, batch size, LoRA rank (on to_k/to_q/to_v/
to_out.0, gaussian init), precision, gradient checkpointing, seed 0, AdamW at lr 1e-4 with weight decay 1e-2, a
constant schedule with no warmup, gradient clipping at 1.0, and no checkpoint inside the measured steps (ours writes
its one checkpoint at the last step, the reference writes its final LoRA: end-of-run costs that the method cancels).

Our side runs the real preparation first (validate -> caption -> resize -> encode, each `python -m sd_tasks` in a
subprocess); its time, encode's in particular, is a one-off cost, reported but not counted in steps/s. Square buckets
only (resize --max-aspect-ratio 1), so our latents have exactly the reference's resolution x resolution shape.

Method. Each trainer runs twice, for N and 2N steps, as a subprocess; steps/s = N / (wall(2N) - wall(N)). Model
loading, imports, the first slow steps and the end-of-run save are in both runs and cancel, leaving N steady-state
steps. Before that, each trainer runs once for 2 steps, untimed (--no-warm-up skips it), so that neither measured
run pays for a cold page cache. With --repeat R, R rounds each run both trainers for N then 2N steps; the wall-clock
rate is the median over rounds of each round's N / (wall(2N) - wall(N)). From inside each process: the median time
per step (over 5-step windows after --warmup, pooled over all of that trainer's runs;
the median leaves out the steps during which other processes held the CPU), from when each step ended: ours from the
MLflow timestamps of its per-step `loss` metric, the reference from the moments its progress bar shows each step on
stderr (it refreshes every step, as it sets the loss postfix). On a shared machine the wall-clock figure moves by
several tenths from run to run (a start-up can vary by seconds), so the in-process median is the headline figure and
the wall-clock one a cross-check that also counts whatever the in-process stamps miss. Use enough steps that N steps
take well over the start-up's jitter.

Peak memory: on CPU the peak RSS of each run's process tree (wait4's rusage: the largest process, which is the
trainer; for the reference under `accelerate launch`, the script's process). On CUDA the peak `memory.used` that
nvidia-smi reports while the run is alive (polled every 0.2 s, minus what was in use before it started; CUDA context
included for both), and, for ours, torch.cuda.max_memory_allocated from its MLflow run. Model FLOPs utilisation (CUDA
only): FLOPs of one UNet forward + backward with LoRA (torch.utils.flop_counter, gradient checkpointing off, so
recomputation is not counted) / (seconds per step x --peak-tflops). Both trainers do the same UNet work, so their
MFU ratio equals their speed ratio; the reference's per-step VAE encode is work that does not count as model FLOPs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "sample_data" / "dog"
DEFAULT_REFERENCE_PYTHON = "/tmp/refvenv/bin/python"
PROMPT = "a photo of sks dog"
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
SEED = 0
PROGRESS = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py")
    parser.add_argument("--reference-python", default=os.environ.get("DREAMLINE_REFERENCE_PYTHON",
                                                                     DEFAULT_REFERENCE_PYTHON),
                        help="python of the venv that runs the reference ($DREAMLINE_REFERENCE_PYTHON)")
    parser.add_argument("--base-model", help="SDXL pipeline folder (default: a tiny random one built here)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of subject images")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="N: each trainer runs N and 2N steps")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                        help="adamw8bit: bitsandbytes (CUDA only); the reference's --use_8bit_adam")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads per trainer (OMP_NUM_THREADS; accelerate's --num_cpu_threads_per_process)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (trainer, steps); the fastest is kept")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the in-process cross-check")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="first run each trainer once for 2 steps, untimed (a cold first start is slower)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak dense TFLOP/s at the training precision, for MFU (H100 SXM bf16)")
    parser.add_argument("--keep", type=Path, help="keep the work folder (models, cache, logs) here")
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)  # internal: the MFU probe
    args = parser.parse_args(argv)
    if args.count_flops:
        print(json.dumps({"flops": count_flops(args)}))
        return 0
    if args.reference is None:
        parser.error("--reference PATH is required (diffusers' train_dreambooth_lora_sdxl.py)")
    if not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file")
    if not Path(args.reference_python).exists():
        parser.error(f"--reference-python {args.reference_python}: no such file (see the module docstring)")
    if args.device == "cuda" and shutil.which("nvidia-smi") is None:
        parser.error("--device cuda needs nvidia-smi")

    print(f"machine: {machine()}")
    print(f"code: {code_version()}")
    print(f"load average at start: {load()}")
    settings = (f"{args.resolution} px, batch {args.batch_size}, rank {args.rank}, precision {args.mixed_precision}, "
                f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.optimizer}, "
                f"{args.device}, {args.steps} and {2 * args.steps} steps, repeat {args.repeat}")
    print(f"settings: {settings}")

    work = Path(tempfile.mkdtemp(prefix="dreamline-bench-train-"))
    try:
        env = child_env(args, work)
        model = args.base_model
        if model is None:
            model = str(work / "tiny-sdxl")
            step(env, "tiny-model", model)
        prep = prepare(args, env, work, model)
        print("preparation (one-off, not in steps/s): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in prep["seconds"].items()))

        for side in ("ours", "reference") if args.warm_up else ():  # untimed: page cache, .pyc files, allocator
            (train_ours(args, env, prep["cache"], model, 2, work / f"warm-{side}") if side == "ours" else
             train_reference(args, env, model, 2, work / f"warm-{side}"))
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeat):
            for steps in (args.steps, 2 * args.steps):
                for side in ("ours", "reference"):
                    out = work / f"{side}-{steps}-{r}"
                    result = (train_ours(args, env, prep["cache"], model, steps, out) if side == "ours" else
                              train_reference(args, env, model, steps, out))
                    runs.setdefault((side, steps), []).append(result)
                    print(f"  {side:9s} {steps:4d} steps: {result['wall_s']:7.2f} s wall, "
                          f"peak {result['peak_mib']:.0f} MiB, load {load()}", flush=True)

        figures = {side: summarise(args, runs[(side, args.steps)], runs[(side, 2 * args.steps)])
                   for side in ("ours", "reference")}
        if args.device == "cuda":
            flops = probe_flops(args, env, model)
            for side in figures:
                figures[side]["mfu"] = flops / figures[side]["s_per_step"] / (args.peak_tflops * 1e12)
            print(f"UNet forward + backward: {flops / 1e12:.2f} TFLOP per step (batch {args.batch_size})")
        report(args, figures, prep)
        print(json.dumps({"settings": vars(args) | {"base_model": model},
                          "machine": machine(), "code": code_version(), "prep_seconds": prep["seconds"], **figures},
                         default=str))
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---- our side ----------------------------------------------------------------------------------------------------

def child_env(args, work: Path) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env |= {"DREAMLINE_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")}
    if args.device == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(args.threads)}
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
    experiment = f"bench-{out.name}"  # one MLflow run per benchmark run (train reuses runs by lr within an experiment)
    cmd = [sys.executable, "-m", "sd_tasks", "train", "--cache", cache, "--output", str(out), "--base-model", model,
           "--learning-rate", str(LEARNING_RATE), "--max-steps", str(steps), "--checkpointing-steps", str(steps),
           "--rank", str(args.rank), "--batch-size", str(args.batch_size), "--lr-scheduler", "constant",
           "--lr-warmup-steps", "0", "--weight-decay", str(WEIGHT_DECAY), "--max-grad-norm", "1.0",
           "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer, "--seed", str(SEED),
           "--experiment", experiment,
           "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
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

def train_reference(args, env: dict, model: str, steps: int, out: Path) -> dict:
    launch = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    if args.device == "cpu":
        launch += ["--cpu", "--num_cpu_threads_per_process", str(args.threads)]
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
    if args.optimizer == "adamw8bit":
        cmd.append("--use_8bit_adam")
    ref_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # not our package in its venv
    result = timed(cmd, ref_env, out, args.device)
    result["inner"] = {}
    return result


# ---- measuring a run ---------------------------------------------------------------------------------------------

def timed(cmd: list[str], env: dict, out: Path, device: str) -> dict:
    """Run `cmd`; wall seconds, peak memory (MiB) and when each progress-bar step appeared on its stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr, stamps = [], [], {}
    gpu = GpuPoller() if device == "cuda" else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    readers = [threading.Thread(target=lambda: stdout.append(proc.stdout.read())),
               threading.Thread(target=read_progress, args=(proc.stderr, stderr, stamps))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    gpu_peak = gpu.stop() if gpu else None
    text_out, text_err = stdout[0].decode(errors="replace"), b"".join(stderr).decode(errors="replace")
    (out.parent / f"{out.name}.log").write_text(text_err + text_out)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{text_err[-3000:]}")
    peak = gpu_peak if gpu else usage.ru_maxrss / 1024  # Linux: KiB
    return {"wall_s": wall, "peak_mib": peak, "stdout": text_out, "step_times": stamps}


def read_progress(stream, chunks: list[bytes], stamps: dict[int, float]) -> None:
    """Keep stderr; note when tqdm first shows each `Steps: ... k/N` (wall-clock seconds, like MLflow's)."""
    pending = b""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            return
        now = time.time()
        chunks.append(chunk)
        pending += chunk
        *lines, pending = re.split(rb"[\r\n]", pending)
        for line in lines:
            m = PROGRESS.search(line.decode(errors="replace"))
            if m:
                stamps.setdefault(int(m.group(1)), now)


class GpuPoller:
    """Peak nvidia-smi memory.used (MiB) above what was in use when it started."""

    def __init__(self, every: float = 0.2):
        self.base = self.used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def used() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True).stdout
        return float(out.split()[0])

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.used())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def summarise(args, short: list[dict], long: list[dict]) -> dict:
    """Wall-clock steps/s from each round's pair of runs (N then 2N steps, run minutes apart at most), the median
    over rounds; the in-process median from the per-step stamps."""
    per_step = statistics.median((b["wall_s"] - a["wall_s"]) / args.steps for a, b in zip(short, long))
    fast_short, fast_long = min(short, key=lambda r: r["wall_s"]), min(long, key=lambda r: r["wall_s"])
    figures = {"steps_per_s": 1 / per_step if per_step > 0 else float("nan"), "s_per_step": per_step,
               "wall_short_s": fast_short["wall_s"], "wall_long_s": fast_long["wall_s"],
               "peak_mib": max(r["peak_mib"] for r in short + long),
               "inner_steps_per_s": inner_rate([r["step_times"] for r in short + long], args.warmup)}
    inner = fast_long.get("inner") or {}
    if "peak_gpu_memory_gb" in inner:
        figures["torch_peak_allocated_mib"] = inner["peak_gpu_memory_gb"] * 1024
    return figures


def inner_rate(runs: list[dict[int, float]], warmup: int, window: int = 5) -> float | None:
    """1 / the median seconds per step over windows of `window` steps after `warmup`, pooled over all runs: the
    median ignores the steps during which another process took the CPU; windows smooth over stamps that arrived
    together or were rounded to the millisecond. A run's stamp of step k is the moment step k ended."""
    per_step = sorted((stamps[k] - stamps[k - window]) / window for stamps in runs for k in stamps
                      if k - window >= warmup and k - window in stamps)
    if not per_step or per_step[len(per_step) // 2] <= 0:
        return None
    return 1 / per_step[len(per_step) // 2]


# ---- model FLOPs (CUDA) ------------------------------------------------------------------------------------------

def probe_flops(args, env: dict, model: str) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--count-flops", "--base-model", model, "--resolution",
           str(args.resolution), "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--mixed-precision",
           args.mixed_precision, "--device", args.device]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"FLOP count failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["flops"]


def count_flops(args) -> float:
    """FLOPs of one UNet forward + backward with our LoRA, on random inputs of the training shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO))
    from sd_tasks import models
    from sd_tasks.train import TrainConfig, add_lora

    device = torch.device(args.device)
    unet = models.load_unet(args.base_model)
    config = TrainConfig(cache="", output="", base_model=args.base_model, rank=args.rank)
    add_lora(unet, config)  # gradient checkpointing off: count the model's FLOPs, not the recomputation
    unet.to(device)
    c = unet.config
    b, side = args.batch_size, args.resolution // 8
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    latents = torch.randn(b, c.in_channels, side, side, device=device)
    timesteps = torch.randint(0, 1000, (b,), device=device)
    text = torch.randn(b, 77, c.cross_attention_dim, device=device)
    cond = {"text_embeds": torch.randn(b, pooled, device=device),
            "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * b,
                                     dtype=torch.float32, device=device)}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        prediction = unet(latents, timesteps, text, added_cond_kwargs=cond).sample
        torch.nn.functional.mse_loss(prediction.float(), torch.randn_like(prediction.float())).backward()
    return float(counter.get_total_flops())


# ---- reporting ---------------------------------------------------------------------------------------------------

def report(args, figures: dict, prep: dict) -> None:
    ours, ref = figures["ours"], figures["reference"]
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"load average at the end: {load()}")
    print(f"\n{'':30s} {'steps/s':>8s} {'s/step':>8s} {'in-process median steps/s':>26s} {memory:>13s} "
          f"{'wall N s':>9s} {'wall 2N s':>10s}" + (f" {'MFU':>6s}" if "mfu" in ours else ""))
    for name, f in (("dreamline (encode cache)", ours), ("reference (VAE every step)", ref)):
        inner = f"{f['inner_steps_per_s']:.2f}" if f["inner_steps_per_s"] else "-"
        print(f"{name:30s} {f['steps_per_s']:8.2f} {f['s_per_step']:8.3f} {inner:>26s} {f['peak_mib']:13.0f} "
              f"{f['wall_short_s']:9.1f} {f['wall_long_s']:10.1f}" + (f" {f['mfu']:6.1%}" if "mfu" in f else ""))
    if "torch_peak_allocated_mib" in ours:
        print(f"dreamline torch.cuda.max_memory_allocated: {ours['torch_peak_allocated_mib']:.0f} MiB")
    print()
    if ours["inner_steps_per_s"] and ref["inner_steps_per_s"]:
        print(f"steps/s ratio (dreamline / reference), in-process median: "
              f"{ours['inner_steps_per_s'] / ref['inner_steps_per_s']:.2f}x")
    print(f"steps/s ratio (dreamline / reference), wall clock N vs 2N: {ours['steps_per_s'] / ref['steps_per_s']:.2f}x")
    print(f"peak memory ratio (dreamline / reference): {ours['peak_mib'] / ref['peak_mib']:.2f}")
    if min(ours["s_per_step"], ref["s_per_step"]) <= 0:
        print("warning: wall(2N) <= wall(N): start-up noise swamps N steps here; raise --steps or --repeat")
        return
    saving = ref["s_per_step"] - ours["s_per_step"]
    payback = f"; encode is paid back after {prep['seconds']['encode'] / saving:.0f} steps" if saving > 0 else ""
    print(f"one-off encode: {prep['seconds']['encode']:.1f} s (whole preparation "
          f"{sum(prep['seconds'].values()):.1f} s) = {prep['seconds']['encode'] / ours['s_per_step']:.0f} of our "
          f"steps; a steady-state step saves {saving:.3f} s{payback}")


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

    dirty = git("status", "--porcelain", "--", "sd_tasks")
    return f"{git('rev-parse', '--short', 'HEAD') or 'unknown'}{' + uncommitted changes in sd_tasks/' if dirty else ''}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
