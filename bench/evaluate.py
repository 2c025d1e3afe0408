"""Benchmark evaluation: one process per checkpoint, one per training run, or evaluation inside training.

    .venv/bin/python bench/evaluate.py [--learning-rates 1e-4 5e-4 1e-5] [--checkpoints 3] [--repeat 2]

Setup (untimed): the tiny SDXL and evaluators, sample_data/dog through validate -> caption -> resize -> encode at
64 px. Each round trains every learning rate with the real `python -m sd_tasks train` (wall, CPU, s/step), then
evaluates its checkpoints with the DAG's suite at the demo's settings (DreamBench's 25 `live` prompts, class prompt,
2 images per prompt, 4 inference steps, 64 px, seed 0, no evaluation cache, MLflow logging), in alternating order:
  (a) one `evaluate --checkpoint C` process per checkpoint (the DAG's old shape);
  (b) one `evaluate --training-run R` process per learning rate (loads once, LoRA hot-swapped).
Best wall time of each over the rounds. Each evaluate process is `python bench/evaluate.py --probe OUT evaluate ...`:
sd_tasks.cli.main in-process, with wall/CPU timers around the imports, the pipeline load, the evaluators' load, the
base model's class images, each checkpoint's evaluation and each LoRA load.
  (c) inside training is derived from (b)'s parts: a train process evaluating at each checkpoint would add all of
      them but the process's start, imports and exit to training's time.
CPU seconds: getrusage(RUSAGE_CHILDREN) around each process; peak RSS: wait4. docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.time()  # in a --probe process: when the interpreter had started (and these imports were done)

REPO = Path(__file__).resolve().parents[1]
PARTS = ("pipeline", "evaluators", "base_images")  # loaded or made once per evaluate process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4, 5e-4, 1e-5],
                        help="one training run each (the demo's three)")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per training run")
    parser.add_argument("--checkpointing-steps", type=int, default=10, help="training steps between checkpoints")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--inference-steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=25, help="the first N of DreamBench's 25 live prompts")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (2 threads on this "
                        "shared 2-core machine, busy with other work, ran up to 10x slower and erratically)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the best wall time of each variant is kept")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    args = parser.parse_args(argv)

    print(f"machine: {machine()}; load average at start {load()}")
    work = Path(tempfile.mkdtemp(prefix="dreamline-bench-eval-"))
    env = dict(os.environ) | {"DREAMLINE_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                              "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        suite = setup(args, env, work)
        report(args, [one_round(args, env, work / f"round-{r}", suite, r) for r in range(args.repeat)])
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def setup(args, env: dict, work: Path) -> list[str]:
    sys.path.insert(0, str(REPO / "plugins"))
    from dreamline.params import DREAMBENCH_PROMPTS

    models = run_step(env, work, "tiny-model", str(work / "tiny"), "--evaluators", str(work / "evaluators"))["json"]
    run_step(env, work, "validate", "--input", str(REPO / "sample_data" / "dog"), "--output", str(work / "validated"))
    run_step(env, work, "caption", "--report", str(work / "validated"), "--output", str(work / "captioned"),
             "--instance-prompt", "a photo of sks dog")
    run_step(env, work, "resize", "--captions", str(work / "captioned"), "--output", str(work / "resized"),
             "--resolution", str(args.resolution))
    cache = run_step(env, work, "encode", "--images", str(work / "resized"), "--output", str(work / "cache"),
                     "--base-model", models["sdxl"])["json"]["cache"]
    env["BENCH_CACHE"], env["BENCH_MODEL"] = cache, models["sdxl"]
    prompts = [p.format(instance="sks dog", class_noun="dog") for p in DREAMBENCH_PROMPTS["live"][:args.prompts]]
    return ["--instance-images", str(work / "resized"), *[a for p in prompts for a in ("--prompts", p)],
            "--class-prompts", "a photo of dog", "--clip-model", models["clip"], "--dino-model", models["dino"],
            "--base-model", models["sdxl"], "--images-per-prompt", str(args.images_per_prompt),
            "--num-inference-steps", str(args.inference_steps), "--resolution", str(args.resolution), "--seed", "0"]


def one_round(args, env: dict, out: Path, suite: list[str], r: int) -> dict:
    steps = args.checkpoints * args.checkpointing_steps
    runs, result = {}, {"train": [], "a": [], "b": []}
    for lr in args.learning_rates:
        runs[lr] = out / "train" / f"lr-{lr:g}"
        t = run_step(env, out, "train", "--cache", env["BENCH_CACHE"], "--output", str(runs[lr]),
                     "--base-model", env["BENCH_MODEL"], "--learning-rate", str(lr), "--max-steps", str(steps),
                     "--checkpointing-steps", str(args.checkpointing_steps), "--experiment", f"bench-{out.name}")
        t["s_per_step"] = train_seconds(env, t["json"]["run_id"]) / steps
        result["train"].append(t)
    for variant in ("a", "b") if r % 2 == 0 else ("b", "a"):
        for lr, folder in runs.items():
            targets = ([["--training-run", str(folder)]] if variant == "b" else
                       [["--checkpoint", str(folder / f"checkpoint-{k * args.checkpointing_steps}")]
                        for k in range(1, args.checkpoints + 1)])
            for i, target in enumerate(targets):
                o = out / variant / f"lr-{lr:g}" / (f"step-{i}" if variant == "a" else "")
                result[variant].append(run_step(env, out, "evaluate", *target, "--output", str(o), *suite, probe=True))
    totals = {k: total(v) for k, v in result.items()}
    print(f"round {r + 1}: train {totals['train']['wall']:.1f} s, (a) per checkpoint {totals['a']['wall']:.1f} s, "
          f"(b) per run {totals['b']['wall']:.1f} s, ratio {totals['a']['wall'] / totals['b']['wall']:.2f}x; "
          f"load {load()}", flush=True)
    return result


def run_step(env: dict, work: Path, name: str, *argv: str, probe: bool = False) -> dict:
    """One `python -m sd_tasks <name>` process (through the probe for evaluate): wall, CPU, peak RSS, its JSON."""
    work.mkdir(parents=True, exist_ok=True)
    fd, probe_file = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    cmd = [sys.executable, *([str(Path(__file__)), "--probe", probe_file] if probe else ["-m", "sd_tasks"]),
           name, *argv]
    log = work / f"{Path(probe_file).stem}.log"
    with open(log, "wb") as err, tempfile.TemporaryFile() as stdout:
        before, spawned, started = cpu_children(), time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=stdout, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: RUSAGE_CHILDREN now counts it; its own peak RSS
        wall, code = time.perf_counter() - started, os.waitstatus_to_exitcode(status)
        proc.returncode = code  # reaped here, not by Popen
        stdout.seek(0)
        text = stdout.read().decode(errors="replace")
    if code:
        raise SystemExit(f"{name} failed ({code}), see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    result = {"wall": wall, "cpu": cpu_children() - before, "processes": 1,
              "rss_mib": usage.ru_maxrss / 1024, "json": json.loads(text.strip().splitlines()[-1])}
    if probe:
        parts = json.loads(Path(probe_file).read_text())
        result |= {"parts": parts, "start": parts.pop("entry") - spawned}
    return result


def probe(out: Path, argv: list[str]) -> int:
    """`python -m sd_tasks <argv>` in this process, timing the evaluate step's parts (wall and CPU, each part
    without the parts inside it); the timings go to `out`."""
    import functools

    parts: dict = {"entry": START}  # part: [[wall, cpu] per call]
    stack: list[list[float]] = []

    def timed(key: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            stack.append([0.0, 0.0])
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                took = [time.perf_counter() - wall, time.process_time() - cpu]
                inner = stack.pop()
                if stack:
                    stack[-1] = [s + t for s, t in zip(stack[-1], took)]
                parts.setdefault(key, []).append([t - i for t, i in zip(took, inner)])
        return wrapper

    wall, cpu = time.perf_counter(), time.process_time()
    from functools import cached_property

    import diffusers

    from sd_tasks import cli
    from sd_tasks.evaluation import evaluate
    parts["imports"] = [[time.perf_counter() - wall, time.process_time() - cpu]]
    evaluate.Generator.__init__ = timed("pipeline", evaluate.Generator.__init__)
    evaluate.Scorer.__init__ = timed("evaluators", evaluate.Scorer.__init__)
    base_images = cached_property(timed("base_images", evaluate.Evaluator.base_class_images.func))
    base_images.__set_name__(evaluate.Evaluator, "base_class_images")
    evaluate.Evaluator.base_class_images = base_images
    evaluate.evaluate = timed("checkpoint", evaluate.evaluate)  # run() and evaluate_training_run() call it by name
    pipeline = diffusers.StableDiffusionXLPipeline
    pipeline.load_lora_weights = timed("lora", pipeline.load_lora_weights)  # inside "checkpoint"
    wall, cpu = time.perf_counter(), time.process_time()
    code = cli.main(argv)
    parts["run"] = [[time.perf_counter() - wall, time.process_time() - cpu]]
    out.write_text(json.dumps(parts))
    return code


def train_seconds(env: dict, run_id: str) -> float:
    """train's own timing of its loop (steps and checkpoint writes), from its MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(env['DREAMLINE_HOME']) / 'mlflow' / 'mlflow.db'}")
    return client.get_run(run_id).data.metrics["train_seconds"]


def total(procs: list[dict]) -> dict:
    """Sums over processes; for evaluate ones, per part: wall, CPU (`<part>_cpu`) and each call's wall (`<part>s`)."""
    t = {k: sum(p[k] for p in procs) for k in ("wall", "cpu", "processes")} | {
        "rss_mib": max(p["rss_mib"] for p in procs)}
    if procs and "parts" in procs[0]:
        for key in PARTS + ("imports", "run", "checkpoint", "lora"):
            calls = [c for p in procs for c in p["parts"].get(key, [])]
            walls = [c[0] for c in calls]
            t |= {key: sum(walls), key + "_cpu": sum(c[1] for c in calls), key + "s": walls}
        t["start"] = sum(p["start"] for p in procs)
        t["loads"] = sum(t[k] for k in PARTS)
        t["rest"] = t["wall"] - t["loads"] - t["checkpoint"]  # start, imports, suite fingerprint, exit
    return t


def report(args, rounds: list[dict]) -> None:
    best = {k: min((total(r[k]) for r in rounds), key=lambda t: t["wall"]) for k in ("train", "a", "b")}
    a, b, train = best["a"], best["b"], best["train"]
    n_lr, steps = len(args.learning_rates), args.checkpoints * args.checkpointing_steps
    s_step = min(p["s_per_step"] for r in rounds for p in r["train"])
    in_eval = b["loads"] + b["checkpoint"]  # (c): all of (b) but its processes' start, imports and exit
    in_cpu = sum(b[k + "_cpu"] for k in PARTS) + b["checkpoint_cpu"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\nload average at the end: {load()}; {n_lr} training run(s) x {args.checkpoints} checkpoints, "
          f"{args.prompts} prompts x {args.images_per_prompt} images + 1 class prompt, {args.inference_steps} "
          f"inference steps, {args.resolution} px, {args.threads} threads, best of {len(rounds)} round(s)")
    print("\n| variant | processes | wall s | CPU s | per checkpoint s | loads s | start, imports, exit s | "
          "peak RSS MiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t in (("(a) per checkpoint", a), ("(b) per training run", b)):
        print(f"| {name} | {t['processes']} | {t['wall']:.1f} | {t['cpu']:.1f} | {mean(t['checkpoints']):.1f} | "
              f"{t['loads']:.1f} | {t['rest']:.1f} | {t['rss_mib']:.0f} |")
    print(f"| (c) inside training (from (b)'s parts) | 0 | +{in_eval:.1f} in train | +{in_cpu:.1f} | "
          f"{mean(b['checkpoints']):.1f} | {b['loads']:.1f} | 0 | train's + (b)'s |")
    print(f"| training alone ({steps} steps per run) | {train['processes']} | {train['wall']:.1f} | "
          f"{train['cpu']:.1f} | {s_step:.2f} s/step | | | {train['rss_mib']:.0f} |")
    print(f"\nratio (a)/(b): {a['wall'] / b['wall']:.2f}x wall, {a['cpu'] / b['cpu']:.2f}x CPU; "
          f"{a['processes']} processes -> {b['processes']}")
    for name, t, n in (("(a)", a, a["processes"]), ("(b)", b, n_lr)):
        print(f"{name} per process: start {t['start'] / n:.1f} s, imports {t['imports'] / n:.1f} s, pipeline "
              f"{t['pipeline'] / n:.1f} s, evaluators {t['evaluators'] / n:.1f} s, base class images "
              f"{t['base_images'] / n:.1f} s, rest {t['rest'] / n:.1f} s; checkpoints "
              + ", ".join(f"{w:.1f}" for w in t["checkpoints"]) + " s (LoRA load/swap "
              + ", ".join(f"{w:.2f}" for w in t["loras"]) + " s)")
    saved = b["wall"] - in_eval
    print(f"(c) against (b), per learning rate: saves {saved / n_lr:.1f} s (start, imports, exit), "
          f"{(saved + b['pipeline']) / n_lr:.1f} s at most (the pipeline load too, were the training UNet reused); "
          f"adds {in_eval / n_lr:.1f} s to the train task ({train['wall'] / n_lr:.1f} s alone: "
          f"+{in_eval / train['wall'] * 100:.0f}%), i.e. {mean(b['checkpoints']) / s_step:.0f} training steps "
          f"per checkpoint evaluated; peak RSS train {train['rss_mib']:.0f} MiB, evaluate {b['rss_mib']:.0f} MiB")
    print(json.dumps({"settings": vars(args), "best": best, "s_per_step": s_step, "in_training_eval_s": in_eval,
                      "saved_s": saved}, default=str))


def cpu_children() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{len(os.sched_getaffinity(0))} usable CPUs ({os.cpu_count()} in all), {model}, Python " \
           f"{platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
