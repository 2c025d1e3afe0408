"""The image API: each subject's served LoRA behind one HTTP interface (FastAPI; its OpenAPI page at /docs).

    POST /v1/subjects/{subject}/images   images of the subject: JSON with base64 PNGs, or `Accept: image/png` for one
    GET  /v1/subjects                    every subject model and the version its alias names
    GET  /healthz, /readyz               alive; the base model loaded
    GET  /metrics                        Prometheus: requests, latency, adapter loads and hits, queue length

Every image comes back with the registered model, its version, the seed and the parameters, so it can be made
again. Bad input is a 4xx with a one-line reason (unknown subject 404, no servable version 409, a full queue 429),
never a traceback. /v1 needs the deployment's API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`).
"""
from __future__ import annotations

import base64
import hmac
import secrets
import time
from typing import Protocol

from fastapi import Depends, FastAPI, HTTPException, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from sd_tasks.safety.marking import MESSAGE, METHOD, MIN_PIXELS
from sd_tasks.serving.champions import Champions, NotServable, Served
from sd_tasks.serving.renderer import Request

MAX_SEED = 2**31 - 1


class ImageRequest(BaseModel):
    """Images of a subject: `{instance}` in the prompt becomes the subject's words as its version was trained
    (`a photo of {instance} on a beach`); a prompt without it is used as written."""

    model_config = {"extra": "forbid"}

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the first image's seed; the k-th uses seed + k")
    num_images: int = Field(1, ge=1)
    steps: int = Field(25, ge=1)
    guidance: float = Field(5.0, ge=0, le=30)
    width: int | None = Field(None, ge=64, description="a multiple of 8; default: the base model's native size")
    height: int | None = Field(None, ge=64, description="a multiple of 8; default: the base model's native size")
    refine: bool = Field(False, description="pass the last fifth of the denoising to the SDXL refiner (a server "
                                            "started with a refiner model)")

    @field_validator("width", "height")
    @classmethod
    def multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8 (SDXL's VAE works in 8-pixel cells)")
        return value


class Limits(BaseModel):
    """What one request may ask for, and how many may wait."""

    max_images: int = 4
    max_steps: int = 100
    max_side: int = 2048
    max_queue: int = 8  # requests running or waiting; more are answered 429


class Backend(Protocol):
    """Where images are made: this process (renderer.LocalBackend) or a Ray Serve deployment of replicas
    (ray_app.RayBackend). The API checks a request against the base model's facts before it reaches a backend."""

    base_model: str
    native_size: int  # pixels per side when a request names no size
    max_tokens: int  # what the first text encoder reads
    counts: dict[str, int]  # adapter loads, hits, evictions, as metrics
    refiner: bool  # whether requests may ask to refine
    signs: bool  # whether its PNGs carry C2PA Content Credentials (sd_tasks.safety.credentials)

    def token_count(self, prompt: str) -> int: ...

    async def render(self, served: Served, request: Request) -> tuple[list[bytes], str]:
        """PNGs, one per seed, and the replica that made them; NotServable for a version whose LoRA is refused."""


def create_app(backend: Backend, champions: Champions, api_key: str, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="Dreamline images", version="1",
                  description="Each subject's champion SDXL DreamBooth-LoRA, as the MLflow registry names it.")
    registry = CollectorRegistry()
    requests = Counter("dreamline_requests", "image requests", ["status"], registry=registry)
    latency = Histogram("dreamline_request_seconds", "time to answer an image request", registry=registry,
                        buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160))
    queue = Gauge("dreamline_queue_length", "image requests running or waiting", registry=registry)
    for name in backend.counts:
        Gauge(f"dreamline_{name}", name.replace("_", " "), registry=registry).set_function(
            lambda name=name: backend.counts[name])
    native = backend.native_size
    pending = {"n": 0}

    def refuse(status: int, reason: str) -> JSONResponse:
        requests.labels(str(status)).inc()
        return JSONResponse({"detail": reason}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def one_line(_, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return refuse(422, f"{where}: {first['msg']}")

    def api_key_given(http: HttpRequest) -> None:
        """Before anything else of a /v1 request is looked at (its body included): the key, or 401."""
        given = http.headers.get("x-api-key") or http.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            requests.labels("401").inc()
            raise HTTPException(401, "an API key is needed: Authorization: Bearer KEY")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "base_model": backend.base_model}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/subjects", dependencies=[Depends(api_key_given)])
    def subjects():
        try:
            return {"subjects": champions.subjects()}
        except NotServable as exc:
            return refuse(exc.status, exc.reason)

    @app.post("/v1/subjects/{subject}/images", dependencies=[Depends(api_key_given)])
    async def images(subject: str, body: ImageRequest, http: HttpRequest):
        began = time.monotonic()
        width, height = body.width or native, body.height or native
        if body.num_images > limits.max_images:
            return refuse(422, f"num_images: at most {limits.max_images}")
        if body.steps > limits.max_steps:
            return refuse(422, f"steps: at most {limits.max_steps}")
        if max(width, height) > limits.max_side:
            return refuse(422, f"width, height: at most {limits.max_side}")
        if body.refine and not backend.refiner:
            return refuse(422, "refine: this server has no refiner model")
        try:
            served = await run_in_threadpool(champions.served, subject)
        except NotServable as exc:
            return refuse(exc.status, exc.reason)
        if served.base_model and served.base_model != backend.base_model:
            return refuse(409, f"{served.model} version {served.version} was trained on {served.base_model}; this "
                               f"server runs {backend.base_model}")
        if "{instance}" in body.prompt and not served.instance:
            return refuse(409, f"{served.model} version {served.version} records no instance words: write the "
                               f"subject's words in the prompt instead of {{instance}}")
        prompt = body.prompt.replace("{instance}", served.instance or "")
        if (tokens := backend.token_count(prompt)) > backend.max_tokens:
            return refuse(422, f"prompt: {tokens} tokens, the text encoder reads at most {backend.max_tokens}")
        if pending["n"] >= limits.max_queue:
            return refuse(429, f"{pending['n']} requests running or waiting; try again shortly")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - limits.max_images)
        request = Request(prompt, body.negative_prompt, tuple(seed + k for k in range(body.num_images)), body.steps,
                          body.guidance, width, height, body.refine)
        pending["n"] += 1
        queue.set(pending["n"])
        try:
            pngs, replica = await backend.render(served, request)
        except NotServable as exc:
            return refuse(exc.status, exc.reason)
        finally:
            pending["n"] -= 1
            queue.set(pending["n"])
        requests.labels("200").inc()
        latency.observe(time.monotonic() - began)
        made = {"subject": subject, "model": served.model, "version": served.version, "alias": served.alias,
                "prompt": prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
                "guidance": request.guidance, "width": width, "height": height, "refine": request.refine,
                "replica": replica, "watermark": watermark(width, height),
                "credentials": "c2pa" if backend.signs else "none"}
        if "image/png" in http.headers.get("accept", "") and len(pngs) == 1:
            headers = {"X-Dreamline-Model": served.model, "X-Dreamline-Version": str(served.version),
                       "X-Dreamline-Seed": str(request.seeds[0]), "X-Dreamline-Replica": replica,
                       "X-Dreamline-Watermark": made["watermark"], "X-Dreamline-Credentials": made["credentials"]}
            return Response(pngs[0], media_type="image/png", headers=headers)
        return {**made, "images": [{"seed": s, "png": base64.b64encode(b).decode()}
                                   for s, b in zip(request.seeds, pngs)]}

    return app


def watermark(width: int, height: int) -> str:
    """What a response says of its images' invisible mark (sd_tasks.safety.marking)."""
    if width * height >= MIN_PIXELS:
        return f"{METHOD} {MESSAGE.decode()}"
    return "none: smaller than 256x256 pixels"
