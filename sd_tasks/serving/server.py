"""`python -m sd_tasks serve`: the image API (sd_tasks.serving.api) on one machine, until stopped.

One process, one warm base model, the subjects' adapters swapped in (sd_tasks.serving.renderer). The API key comes
from the environment (DREAMLINE_SERVING_API_KEY), never a flag: a command line is visible to every user of the
machine. Scale-out runs the same app on Ray Serve.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.tracking import state_home
from sd_tasks.safety.credentials import Credentials
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, SCREEN_HELP

API_KEY_ENV = "DREAMLINE_SERVING_API_KEY"


@dataclass
class ServeConfig:
    """Serve each subject's registered LoRA over HTTP (FastAPI, OpenAPI at /docs) until stopped."""

    base_model: str = option("SDXL pipeline the LoRAs were trained on: model id or local diffusers folder")
    host: str = option("address to listen on", "127.0.0.1")
    port: int = option("port to listen on", 8000, at_least=1, at_most=65535)
    alias: str = option("the registry alias served per subject (challenger: the latest version, as in the demo)",
                        "champion")
    refresh_seconds: float = option("how old a subject's alias lookup may get before it is looked up again: how "
                                    "soon promote and rollback reach this server", 5.0, at_least=0, at_most=3600)
    adapters: str = option("folder the registered LoRAs are downloaded to (default: DREAMLINE_HOME/serving)", "")
    max_adapters: int = option("LoRAs kept loaded in the pipeline (least recently used one dropped)", 4,
                               at_least=1, at_most=64)
    max_queue: int = option("requests running or waiting; more are answered 429", 8, at_least=1, at_most=1024)
    max_images: int = option("images one request may ask for", 4, at_least=1, at_most=16)
    max_steps: int = option("denoising steps one request may ask for", 100, at_least=1, at_most=200)
    dtype: str = option("inference dtype: auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16",
                        "auto")
    hotswap_rank: int = option("0: load each adapter beside the others; R: swap UNet-only adapters of rank up to R "
                               "into the least recently used one's place (diffusers' LoRA hotswap)", 0,
                               at_least=0, at_most=1024)
    refiner_model: str = option("SDXL refiner for requests that ask to refine (e.g. stabilityai/stable-diffusion-xl-"
                                "refiner-1.0); none by default", "")
    screen: str = option(f"{SCREEN_HELP}; a flagged image is withheld (422)", "nudenet")
    screen_threshold: float = option("detector score from which an image is flagged", DEFAULT_THRESHOLD, above=0,
                                     at_most=1)
    c2pa_cert: str = option("PEM certificate chain (end entity first) to sign C2PA Content Credentials on every image "
                            "with; none by default", "")
    c2pa_key: str = option("PEM private key of --c2pa-cert", "")
    c2pa_algorithm: str = option("the key's signing algorithm: es256, es384, es512, ps256, ps384, ps512 or ed25519",
                                 "es256")
    compile_unet: bool = option("compile the UNet after the first adapter loads (a GPU; with --hotswap-rank a swap "
                                "does not compile again)", False)


def run(config: ServeConfig) -> dict:
    import uvicorn

    from sd_tasks.models.loading import inference_dtype
    from sd_tasks.models.model_refs import pin
    from sd_tasks.serving.api import Limits, create_app
    from sd_tasks.serving.champions import Champions
    from sd_tasks.serving.renderer import LocalBackend, Renderer

    # An alias lookup is on a request's path: a registry that does not answer costs seconds, not MLflow's minutes of
    # retries (champions keeps serving what it last resolved)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    api_key = api_key_from_environment()
    adapters = Path(config.adapters or state_home() / "serving" / "adapters")
    try:  # before the model loads: a folder the server cannot write would fail every first request of a subject
        adapters.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=adapters).close()
    except OSError as exc:
        raise StepError(f"--adapters {adapters}: cannot write the downloaded LoRAs there ({exc.strerror})") from None
    if bool(config.c2pa_cert) != bool(config.c2pa_key):
        raise StepError("--c2pa-cert, --c2pa-key: give both (the chain and its key) or neither")
    credentials = config.c2pa_cert and Credentials.from_files(config.c2pa_cert, config.c2pa_key, config.c2pa_algorithm)
    champions = Champions(adapters, config.alias, config.refresh_seconds)
    # a hub id at the commit it names now (or the cached one offline), as registered versions record their base model
    renderer = Renderer(pin(config.base_model, "--base-model"), inference_dtype(config.dtype), config.max_adapters,
                        config.hotswap_rank or None, config.compile_unet,
                        pin(config.refiner_model, "--refiner-model") if config.refiner_model else None,
                        config.screen, config.screen_threshold, credentials or None)
    limits = Limits(max_images=config.max_images, max_steps=config.max_steps, max_queue=config.max_queue)
    app = create_app(LocalBackend(renderer), champions, api_key, limits)
    print(f"serving {config.alias!r} of every subject on http://{config.host}:{config.port} (OpenAPI: /docs)",
          flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return {"served": f"http://{config.host}:{config.port}", "stopped": True}


def api_key_from_environment() -> str:
    api_key = os.environ.get(API_KEY_ENV, "")
    if len(api_key) < 16:
        raise StepError(f"{API_KEY_ENV}: set it to the API key clients must send, at least 16 characters "
                        f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    return api_key
