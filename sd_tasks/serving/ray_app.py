"""The image API on Ray Serve: the same app as `serve` (sd_tasks.serving.api), its images made by replicas that each
hold one warm base model on a GPU of their own, with requests routed to the replica that already holds the adapter.

    HTTP -> ImageApi (the FastAPI app: key, checks, the registry's alias)
              -> AdapterReplicas, multiplexed by "<model>/<version>" (Ray Serve model multiplexing: an LRU of
                 MAX_ADAPTERS_PER_REPLICA adapters per replica; a request goes where its adapter is loaded)

Replicas scale between `min_replicas` and `max_replicas` on their queue (`target_ongoing_requests` per replica).
Each replica downloads the LoRAs it renders into its own `adapters` folder. Run it with
`serve run sd_tasks.serving.ray_app:build base_model=<ref>` or a Serve config (deploy/kubernetes/rayservice.yaml);
the API key comes from the environment, as for `serve`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from sd_tasks.models.loading import inference_dtype
from sd_tasks.models.model_refs import local_folder, pin
from sd_tasks.safety.credentials import Credentials
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, SCREEN_HELP
from sd_tasks.serving.api import Limits, create_app
from sd_tasks.serving.champions import MODEL_SUFFIX, Champions, NotServable, Served, download
from sd_tasks.serving.renderer import Renderer, Request, adapter_name
from sd_tasks.serving.server import api_key_from_environment

MAX_ADAPTERS_PER_REPLICA = 4


class RayServeArgs(BaseModel):
    """The application's arguments (`serve run ... key=value`, or `args:` in a Serve config)."""

    model_config = {"extra": "forbid"}

    base_model: str
    dtype: str = "auto"
    refiner_model: str = Field("", description="SDXL refiner for requests that ask to refine; none by default")
    screen: str = Field("nudenet", description=SCREEN_HELP)
    screen_threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1)
    c2pa_cert: str = Field("", description="PEM chain to sign C2PA Content Credentials with (a mounted Secret)")
    c2pa_key: str = Field("", description="PEM private key of c2pa_cert")
    c2pa_algorithm: str = "es256"
    alias: str = "champion"
    refresh_seconds: float = Field(5.0, ge=0, le=3600)
    adapters: str = Field("", description="each replica's LoRA folder (default: a temp folder of the replica)")
    gpus_per_replica: float = Field(1, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2, gt=0, description="queue per replica the autoscaler aims at")
    limits: Limits = Limits()


class LoadedAdapter:
    """One adapter in a replica's pipeline, for as long as Ray's multiplexing LRU keeps it (it calls __del__ on
    eviction; so may the garbage collector later, hence the flag)."""

    def __init__(self, renderer: Renderer, served: Served):
        self.renderer, self.served, self.dropped = renderer, served, False

    def __del__(self):
        if not self.dropped:  # on the renderer's thread, after what was asked of it before (one thread into torch)
            self.dropped = True
            self.renderer.thread.submit(self.renderer.unload, adapter_name(self.served))


@serve.deployment(ray_actor_options={"num_gpus": 1}, max_ongoing_requests=2)
class AdapterReplicas:
    def __init__(self, base_model: str, dtype: str, adapters: str, refiner_model: str = "", screen: str = "nudenet",
                 screen_threshold: float = DEFAULT_THRESHOLD, c2pa: tuple[str, str, str] | None = None):
        # one more than Ray's LRU, so Ray's eviction, not the renderer's, decides what leaves
        self.renderer = Renderer(base_model, inference_dtype(dtype), MAX_ADAPTERS_PER_REPLICA + 1,
                                 refiner_model=refiner_model or None, screen=screen, screen_threshold=screen_threshold,
                                 credentials=Credentials.from_files(*c2pa) if c2pa else None)
        self.adapters = adapters or tempfile.mkdtemp(prefix="dreamline-adapters-")
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def adapter(self, model_id: str) -> LoadedAdapter:
        model, version = model_id.rsplit("/", 1)
        folder = await asyncio.to_thread(download, self.adapters, model, int(version))
        served = Served(model.removesuffix(MODEL_SUFFIX), model, int(version), "", "", None, folder)
        await self.renderer.on_its_thread(lambda: self.renderer.load(served))
        return LoadedAdapter(self.renderer, served)

    async def render(self, served: Served, request: Request) -> dict:
        try:
            adapter = await self.adapter(serve.get_multiplexed_model_id())
            served = dataclasses.replace(served, lora=adapter.served.lora)
            pngs = await self.renderer.on_its_thread(lambda: self.renderer.pngs(served, request))
        except NotServable as exc:  # a plain answer: a custom exception does not cross Ray's boundary intact
            return {"refused": [exc.status, exc.reason]}
        return {"replica": self.replica, "pngs": pngs}


class RayBackend:
    """The API's images made by AdapterReplicas; what the API checks a request against read from the base model's
    tokenizer and configs alone (the ingress loads no weights)."""

    def __init__(self, replicas: DeploymentHandle, base_model: str, refiner: bool = False, signs: bool = False):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer

        folder = local_folder(base_model)
        self.replicas, self.base_model, self.counts, self.refiner = replicas, base_model, {}, refiner
        self.signs = signs
        self._tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.max_tokens = int(self._tokenizer.model_max_length)
        vae_blocks = AutoencoderKL.load_config(folder, subfolder="vae")["block_out_channels"]
        self.native_size = int(UNet2DConditionModel.load_config(folder, subfolder="unet")["sample_size"]
                               * 2 ** (len(vae_blocks) - 1))

    def token_count(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, truncation=False).input_ids)

    async def render(self, served: Served, request: Request) -> tuple[list[bytes], str]:
        handle = self.replicas.options(multiplexed_model_id=f"{served.model}/{served.version}")
        result = await handle.render.remote(served, request)
        if "refused" in result:
            raise NotServable(*result["refused"])
        return result["pngs"], result["replica"]


@serve.deployment(num_replicas=1)
@serve.ingress()
class ImageApi:
    def __init__(self, replicas: DeploymentHandle, args: dict):
        # an alias lookup is on a request's path: seconds, not MLflow's minutes of retries (as in `serve`)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        self.args = RayServeArgs(**args)
        self.api_key = api_key_from_environment()
        self.backend = RayBackend(replicas, self.args.base_model, bool(self.args.refiner_model),
                                  c2pa_files(self.args) is not None)
        self.champions = Champions(None, self.args.alias, self.args.refresh_seconds)

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.champions, self.api_key, self.args.limits)


def build(args: dict) -> Application:
    """The application: `serve run sd_tasks.serving.ray_app:build base_model=...`, or a Serve config's import_path."""
    settings = RayServeArgs(**args)
    # one commit for the ingress and every replica, as registered versions record their base model (`id@sha`)
    settings.base_model = pin(settings.base_model, "base_model")
    settings.refiner_model = settings.refiner_model and pin(settings.refiner_model, "refiner_model")
    replicas = AdapterReplicas.options(
        ray_actor_options={"num_gpus": settings.gpus_per_replica},
        autoscaling_config={"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                            "target_ongoing_requests": settings.target_ongoing_requests},
    ).bind(settings.base_model, settings.dtype, settings.adapters, settings.refiner_model, settings.screen,
           settings.screen_threshold, c2pa_files(settings))
    return ImageApi.bind(replicas, settings.model_dump())


def c2pa_files(settings: RayServeArgs) -> tuple[str, str, str] | None:
    """The Content Credentials' chain, key and algorithm (each replica signs what it renders), or None."""
    if bool(settings.c2pa_cert) != bool(settings.c2pa_key):
        raise ValueError("c2pa_cert, c2pa_key: give both (the chain and its key) or neither")
    return (settings.c2pa_cert, settings.c2pa_key, settings.c2pa_algorithm) if settings.c2pa_cert else None
