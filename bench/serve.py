"""Benchmark the image API (`python -m sd_tasks serve`) under load against a bare diffusers loop, side by side.

    .venv/bin/python bench/serve.py [--clients 1 4 16] [--requests 24] [--steps 10] [--base-model REF]

Setup (untimed): the tiny SDXL (or --base-model on a GPU), three subjects, each a LoRA of rank 4 on the UNet's
attention (random weights: the work per image is a trained LoRA's), registered as `register` logs them in a fresh
MLflow store, each its subject's champion.
  (a) the server: cold start (process start to /readyz), then for each number of clients, `--requests` requests
      round-robin over the subjects (one image each, a new seed each), every client waiting for its answer before it
      sends the next: p50/p95 latency, images/s; the server's peak memory (RSS); adapter loads and hits from its
      /metrics.
  (b) the bare loop: one process, the same pipeline loaded the same way, the three LoRAs loaded once as named
      adapters, then the same requests in the same order, one after another (`set_adapters`, then the pipeline): its
      images/s is what the server's one-client figure is set against. Its adapter figures: the time to load one
      LoRA file and to switch adapters, each as a fraction of one image's generation.
Each round runs (b) then (a); the best of `--repeat` rounds. docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUBJECTS = ("rex", "fox", "owl")
KEY = "bench-serving-key-0123456789"
PROMPT = "a photo of {instance} on a beach"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--base-model", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    load_before = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    os.environ.update({"DREAMLINE_HOME": str(home), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    base = args.base_model or tiny_model(home)
    loras = register_subjects(home, base)
    requests = [(SUBJECTS[i % len(SUBJECTS)], 1000 + i) for i in range(args.requests)]
    rounds = []
    for _ in range(args.repeat):
        bare = bare_loop(base, loras, requests, args.steps)
        served = server(home, base, args.clients, requests, args.steps)
        rounds.append({"bare": bare, "server": served})
    best = {"bare": max((r["bare"] for r in rounds), key=lambda b: b["images_per_s"]),
            "server": {str(c): max((r["server"]["clients"][str(c)] for r in rounds), key=lambda s: s["images_per_s"])
                       for c in args.clients},
            "cold_start_s": min(r["server"]["cold_start_s"] for r in rounds),
            "peak_rss_mb": max(r["server"]["peak_rss_mb"] for r in rounds),
            "adapter_counts": rounds[-1]["server"]["adapter_counts"]}
    one = best["server"][str(args.clients[0])]["images_per_s"]
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                          "device": device()},
              "settings": vars(args), "best": best, "rounds": rounds,
              "ratio_server_to_bare_at_one_client": one / best["bare"]["images_per_s"],
              "swap_fraction_of_one_image": best["bare"]["switch_s"] / best["bare"]["image_s"],
              "load_fraction_of_one_image": best["bare"]["load_s"] / best["bare"]["image_s"]}
    report["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def tiny_model(home: Path) -> str:
    out = home / "models" / "tiny-sdxl"
    subprocess.run([sys.executable, "-m", "sd_tasks", "tiny-model", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return str(out)


def register_subjects(home: Path, base: str) -> dict[str, Path]:
    """A random rank-4 UNet LoRA per subject, registered with alias champion, as `register` logs one."""
    import mlflow
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sd_tasks.core import tracking
    from sd_tasks.models.model_refs import local_folder

    unet = StableDiffusionXLPipeline.from_pretrained(local_folder(base)).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    folders = {}
    for index, subject in enumerate(SUBJECTS):
        generator = torch.Generator().manual_seed(index)
        state = {k: torch.randn(v.shape, generator=generator) * 0.05
                 for k, v in get_peft_model_state_dict(unet).items()}
        folder = home / "loras" / subject
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                    safe_serialization=True)
        with mlflow.start_run(experiment_id=tracking.experiment_id("bench-serve")):
            model = mlflow.diffusers.log_model(str(folder / "pytorch_lora_weights.safetensors"), base_model=base,
                                               adapter_type="lora", name="lora", pip_requirements=["diffusers"])
        name = f"{subject}-sdxl-lora"
        version = mlflow.register_model(model.model_uri, name, tags={"base_model": base,
                                                                     "instance": f"sks {subject}"}).version
        tracking.client().set_registered_model_alias(name, "champion", version)
        folders[subject] = folder
    return folders


def bare_loop(base: str, loras: dict[str, Path], requests: list, steps: int) -> dict:
    """The same images in one process with nothing around the pipeline (what a script would do)."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(REPO)!r})
from sd_tasks.models.loading import load_pipeline
pipe = load_pipeline({base!r}, "float32" if not torch.cuda.is_available() else "float16")
loads = []
for subject, folder in {json.dumps({s: str(f) for s, f in loras.items()})}.items():
    began = time.perf_counter()
    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name=subject)
    loads.append(time.perf_counter() - began)
for subject in {json.dumps(list(loras))}:  # warm, as the server is before it is timed
    pipe.set_adapters([subject])
    pipe(prompt="warm", negative_prompt="", num_inference_steps={steps}, guidance_scale=5.0)
switches, images, began = [], [], time.perf_counter()
for subject, seed in {json.dumps(requests)}:
    t = time.perf_counter()
    pipe.set_adapters([subject])
    switches.append(time.perf_counter() - t)
    t = time.perf_counter()
    pipe(prompt={PROMPT!r}.replace("{{instance}}", "sks " + subject), negative_prompt="",
         generator=torch.Generator().manual_seed(seed), num_inference_steps={steps}, guidance_scale=5.0)
    images.append(time.perf_counter() - t)
total = time.perf_counter() - began
print(json.dumps({{"images_per_s": len(images) / total, "image_s": sorted(images)[len(images) // 2],
                  "switch_s": sorted(switches)[len(switches) // 2], "load_s": sorted(loads)[len(loads) // 2]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def server(home: Path, base: str, clients: list[int], requests: list, steps: int) -> dict:
    import psutil

    from deploy.local.seaweedfs import free_ports

    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DREAMLINE_SERVING_API_KEY": KEY}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sd_tasks", "serve", f"--base-model={base}", f"--port={port}",
                             "--max-queue=64", "--max-adapters=4", "--refresh-seconds=60"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = {"rss": 0, "run": True}

    def sample():
        process = psutil.Process(proc.pid)
        while peak["run"]:
            try:
                peak["rss"] = max(peak["rss"], process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    try:
        while True:
            try:
                if call(url, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise SystemExit("the server stopped while starting")
        cold = time.perf_counter() - began
        threading.Thread(target=sample, daemon=True).start()
        for subject in SUBJECTS:  # every adapter downloaded and loaded once, as after a warm-up
            call(url, "POST", f"/v1/subjects/{subject}/images", {"prompt": PROMPT, "seed": 0, "steps": steps})
        results = {str(n): load(url, n, requests, steps) for n in clients}
        metrics = call(url, "GET", "/metrics")[1].decode()
        counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("dreamline_adapter_")}
    finally:
        peak["run"] = False
        proc.terminate()
        proc.wait(timeout=60)
    return {"cold_start_s": cold, "clients": results, "peak_rss_mb": peak["rss"] / 2**20, "adapter_counts": counts}


def load(url: str, clients: int, requests: list, steps: int) -> dict:
    """`clients` threads sharing the request list, each sending its next request when its last is answered."""
    pending, latencies, statuses, lock = list(requests), [], [], threading.Lock()

    def client():
        while True:
            with lock:
                if not pending:
                    return
                subject, seed = pending.pop(0)
            began = time.perf_counter()
            status = call(url, "POST", f"/v1/subjects/{subject}/images",
                          {"prompt": PROMPT, "seed": seed, "steps": steps})[0]
            with lock:
                latencies.append(time.perf_counter() - began)
                statuses.append(status)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - began
    ok = statuses.count(200)
    return {"images_per_s": ok / total, "p50_s": statistics.median(latencies),
            "p95_s": statistics.quantiles(latencies, n=20)[-1], "ok": ok, "refused": len(statuses) - ok}


def call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, method=method, data=data,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with _NO_PROXY.open(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


if __name__ == "__main__":
    sys.exit(main())
