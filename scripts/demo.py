"""`make demo`: the shipped sample subject through the real Airflow DAG to a registered LoRA in MLflow.

Sets up the embedded deployment under DREAMLINE_HOME (its models: the offline tiny ones by default, or with
DREAMLINE_MODELS=hub the real ones fetched and pinned, see deploy/local/models.py; a DVC data registry holding
sample_data/dog, Airflow's database and its `gpu` pool), runs the DAG (DAG_ID) with `airflow dags test` at demo
size, printing one line per task instance as it ends (deploy/local/progress.py; the full output goes to
DREAMLINE_HOME/demo.log), and prints what came out. The Makefile exports the environment (DREAMLINE_HOME,
AIRFLOW_HOME, the DAG and plugin folders).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.local import models  # noqa: E402
from deploy.local.pools import ensure_gpu_pool  # noqa: E402
from deploy.local.progress import RunWatcher  # noqa: E402
from sd_tasks.data.dataset import PublishConfig, publish  # noqa: E402
from sd_tasks.evaluation.select import format_table  # noqa: E402

DAG_ID = "lora_dog"  # the sample subject's DAG (dags/subjects.yaml)
QUIET = 60  # seconds without a task ending before the demo says what is still running
DATASET_TAG = "dog-v1"
# Demo size: the production recipe's shape (three learning rates, several checkpoints each) at 64 px on the tiny
# models; on the real ones (DREAMLINE_MODELS=hub, a GPU), SDXL's own 1024 px, two rates, 200 steps, 8 prompts.
# A second `make demo` finds nothing changed and skips training; `make demo FORCE=1` trains anyway.
FORCE = {"force": os.environ.get("FORCE", "") not in ("", "0")}
# Eight of DreamBench's 25 prompts (scenes, clothes, styles), two images each: every evaluation still runs them all.
DEMO_PROMPTS = ["a {instance} in the jungle", "a {instance} in the snow", "a {instance} on the beach",
                "a {instance} with a city in the background", "a {instance} wearing a red hat",
                "a {instance} in a chef outfit", "a red {instance}", "a shiny {instance}"]
DEMO_CONF = {
    "subject": "dog", "dataset_version": DATASET_TAG, "learning_rates": [1e-4, 5e-4, 1e-5], "max_steps": 20,
    "checkpointing_steps": 10, "resolution": 64, "images_per_prompt": 2, "inference_steps": 4,
    "confirmation_inference_steps": 4, "confirmation_images_per_prompt": 2, "evaluation_prompts": DEMO_PROMPTS,
    **FORCE,
}
GPU_DEMO_CONF = {
    "subject": "dog", "dataset_version": DATASET_TAG, "learning_rates": [1e-4, 5e-4], "max_steps": 200,
    "checkpointing_steps": 100, "images_per_prompt": 2, "confirmation_images_per_prompt": 2,
    "evaluation_prompts": DEMO_PROMPTS, **FORCE,
}


def main() -> int:
    home = Path(os.environ["DREAMLINE_HOME"])
    started = time.monotonic()
    try:  # before any work: models that cannot run here, or cannot be fetched, are said in one line
        chosen = models.chosen(os.environ, home / "models", Path.cwd())
        os.environ.update(models.environment(chosen))
        os.environ.update(models.gpu_environment(chosen))
        tiny = not models.needs_gpu(chosen)
        if not models.from_hub(chosen):  # three independent preparations, mostly in subprocesses: at once
            at_once({"offline models": (ensure_models, chosen, home), "data registry": (ensure_dataset, home),
                     "airflow database": (ensure_airflow,)})
        else:  # hub models first: a download that fails stops the demo before anything else is made
            step("models (fetched once, pinned)", ensure_models, chosen, home)
            step("data registry", ensure_dataset, home)
            step("airflow database", ensure_airflow)
    except (ValueError, RuntimeError) as exc:
        print(f"error: make demo: {exc}", file=sys.stderr)
        return 1
    if dags_test(home / "demo.log", DEMO_CONF if tiny else GPU_DEMO_CONF) != 0:
        print(f"error: the DAG run failed; see {home / 'demo.log'}", file=sys.stderr)
        return 1
    summarize(home, time.monotonic() - started)
    return 0


def dags_test(log_path: Path, conf: dict) -> int:
    """`airflow dags test` with its output in `log_path`, and a line per task instance as it ends, from Airflow's
    database (why there: deploy/local/progress.py); after QUIET seconds without one, what is still running."""
    print(f"==> airflow dags test {DAG_ID} (log: {log_path})", flush=True)
    try:
        watcher = RunWatcher.for_airflow(DAG_ID)  # before the run: it watches the DAG's next one
    except Exception as exc:  # progress is a nicety: the demo runs without it
        print(f"  (no per-task progress: {exc})", flush=True)
        watcher = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        last_line = time.monotonic()
        while True:
            exited = proc.poll() is not None  # before polling: whatever the run wrote is in the database by then
            for ended in watcher.poll() if watcher else []:
                print(ended.line(), flush=True)
                last_line = time.monotonic()
            if exited:
                break
            if watcher and time.monotonic() - last_line > QUIET:
                for name, seconds in watcher.running():
                    print(f"  {name:<34} {'running':<15} {seconds:>6.0f} s so far", flush=True)
                last_line = time.monotonic()
            time.sleep(1)
    if watcher:
        watcher.close()
    return proc.returncode


def ensure_airflow() -> None:
    """Airflow's database, migrated, with the `gpu` pool the DAG's GPU steps run in (DREAMLINE_GPU_SLOTS, 1)."""
    run([sys.executable, "-m", "airflow", "db", "migrate"], quiet=True)
    ensure_gpu_pool(dict(os.environ), cwd=REPO)


def at_once(steps: dict[str, tuple]) -> None:
    """Run the steps in threads (each waits on its own subprocesses or files); one line with each one's seconds."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(func, *args) -> float:
        t = time.monotonic()
        func(*args)
        return time.monotonic() - t

    print(f"==> {', '.join(steps)}", end=" ", flush=True)
    with ThreadPoolExecutor(len(steps)) as pool:
        futures = {name: pool.submit(timed, *call) for name, call in steps.items()}
    try:
        seconds = {name: future.result() for name, future in futures.items()}
    except BaseException:
        print(flush=True)
        raise
    print("(" + ", ".join(f"{s:.0f} s" for s in seconds.values()) + ", at once)", flush=True)


def step(name: str, func, *args) -> None:
    t = time.monotonic()
    print(f"==> {name}", end=" ", flush=True)
    try:
        func(*args)
    except BaseException:
        print(flush=True)  # the error's line starts a line of its own
        raise
    print(f"({time.monotonic() - t:.0f} s)", flush=True)


def ensure_models(chosen: dict[str, str], home: Path) -> None:
    """The tiny models built where the tiny defaults point (never elsewhere); hub models fetched and pinned."""
    ready = models.prepare(chosen, home / "models", dict(os.environ), home / "steps")
    if ready != chosen:
        print(", ".join(ready.values()), end=" ", flush=True)


def ensure_dataset(home: Path) -> None:
    registry = home / "data-registry"
    tags = subprocess.run(["git", "tag"], cwd=registry, capture_output=True, text=True).stdout.split() \
        if registry.exists() else []
    if DATASET_TAG not in tags:
        publish(PublishConfig(source=str(REPO / "sample_data" / "dog"), repo=str(registry), path="dog",
                              tag=DATASET_TAG, remote=str(home / "dvc-remote")))


def run(argv: list[str], quiet: bool = False) -> None:
    proc = subprocess.run(argv, capture_output=quiet, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(argv[1:4])} failed:\n{proc.stdout}{proc.stderr}")


def summarize(home: Path, seconds: float) -> None:
    run_dir = max((home / "runs" / DAG_ID).iterdir(), key=lambda p: p.stat().st_mtime)
    if not (run_dir / "select" / "selection.json").exists():  # the run found nothing to train
        said = re.findall(r"nothing to train: (.*?)(?: \(tick|$)", (home / "demo.log").read_text(), re.M)
        print(f"\nDreamline demo finished in {seconds:.0f} s with nothing to train: {said[-1] if said else ''}.\n"
              f"`make demo FORCE=1` trains again anyway.")
        return
    selection = json.loads((run_dir / "select" / "selection.json").read_text())
    registration = json.loads((run_dir / "register" / "registration.json").read_text())
    dataset = json.loads((run_dir / "dataset" / "dataset.json").read_text())
    best = selection["selected"]
    print(f"\nDreamline demo finished in {seconds:.0f} s. Run folder: {run_dir}\n")
    print(f"Dataset {dataset['path']}@{dataset['rev']} (commit {dataset['commit'][:12]}, {dataset['hash'][:19]}...)\n")
    print(format_table(selection))
    print(f"\nSelected: learning rate {best['learning_rate']:g}, step {best['step']}, normalised score "
          f"{best['score']:+.2f}")
    print(f"Registered: model '{registration['model_name']}' version {registration['version']}"
          f" (aliases: {', '.join(registration['aliases']) or 'none'}); "
          f"{'promoted' if registration['promoted'] else 'not promoted'}: {registration['reason']}")
    if not registration["promoted"] and registration["champion"] is None:
        print("(The demo's CLIP and DINO are random-weight stand-ins: they cannot see a subject, so no LoRA beats the "
              "base model by the margin. With the real evaluators, a LoRA that learned the dog does.)")
    print("\nLook at it: `make ui` starts the Airflow UI (http://localhost:8080) and the MLflow UI "
          "(http://localhost:5000) and prints the Airflow login.")


if __name__ == "__main__":
    sys.exit(main())
