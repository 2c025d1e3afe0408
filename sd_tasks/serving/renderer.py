"""One warm SDXL base per process, and the LoRA adapters swapped into it per request.

Up to `max_adapters` adapters stay loaded in the pipeline (an LRU: the least recently used is deleted to make room),
each under the name `<model>-v<version>`, so a request for a subject served a moment ago only switches adapters
(`set_adapters`), and one for a new version loads its file once. One image batch is generated at a time: the
pipeline's adapters are process state.

With `hotswap_rank`, UNet-only adapters replace the least recently used adapter's weights in place (diffusers'
`enable_lora_hotswap`: same layers, rank at most the one declared), so a compiled UNet (`compile_unet`) is not
compiled again on a swap; an adapter with text-encoder layers cannot be hot-swapped and is loaded beside the others.
"""
from __future__ import annotations

import asyncio
import copy
import io
import os
import socket
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from sd_tasks.models.loading import load_pipeline, load_refiner
from sd_tasks.safety.credentials import Credentials
from sd_tasks.safety.marking import mark
from sd_tasks.safety.screening import DEFAULT_THRESHOLD, load_screen, screen_all
from sd_tasks.serving.champions import NotServable, Served
from sd_tasks.training.checkpoint_files import LORA_WEIGHTS


@dataclass(frozen=True)
class Request:
    """What one request asks for; with the seeds, enough to make the same images again."""

    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    width: int
    height: int
    refine: bool = False  # the base model denoises the first REFINE_FROM of the steps, the refiner the rest


REFINE_FROM = 0.8  # SDXL's ensemble of experts: the refiner takes over for the last fifth of the noise


def adapter_name(served: Served) -> str:
    return f"{served.model}-v{served.version}"


def unet_only(folder: Path) -> bool:
    """Whether a LoRA file adapts the UNet alone (hot-swappable), read from its tensor names, not its weights."""
    with safe_open(folder / LORA_WEIGHTS, "pt") as weights:
        return all(key.startswith("unet.") for key in weights.keys())


class Renderer:
    """The base pipeline and its adapters; `render` is safe to call from several threads (one runs at a time)."""

    def __init__(self, base_model: str, dtype: str = "float32", max_adapters: int = 4,
                 hotswap_rank: int | None = None, compile_unet: bool = False, refiner_model: str | None = None,
                 screen: str = "nudenet", screen_threshold: float = DEFAULT_THRESHOLD,
                 credentials: Credentials | None = None):
        self.base_model = base_model
        self.screen, self.credentials = load_screen(screen, screen_threshold), credentials
        self.pipe = load_pipeline(base_model, dtype)
        self.refiner = load_refiner(refiner_model, self.pipe) if refiner_model else None
        self.max_adapters = max_adapters
        self.loaded: OrderedDict[str, Served] = OrderedDict()
        self._slots: dict[str, str] = {}  # adapter name -> its name in the pipeline (a hot-swapped one: its slot's)
        self.counts = {"adapter_loads": 0, "adapter_hits": 0, "adapter_evictions": 0, "adapter_hotswaps": 0}
        self.hotswap, self.compile_unet = hotswap_rank is not None, compile_unet
        if self.hotswap:  # before the first adapter loads, as diffusers requires
            self.pipe.enable_lora_hotswap(target_rank=hotswap_rank)
        self._lock = threading.RLock()
        # Every call into torch from one thread of its own: OpenMP keeps a team of worker threads per calling thread,
        # and an idle team spins for a while before it sleeps, so requests rendered from a pool of threads made four
        # clients' throughput less than half of one client's on 2 cores (bench/serve.py)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="renderer")
        # Requests are checked while another renders: a tokenizer of their own, since a fast tokenizer's padding and
        # truncation are settings of the object that the pipeline's own calls change (shared, a prompt came out 17
        # tokens long, unpadded, and the pipeline failed)
        self._counter = copy.deepcopy(self.pipe.tokenizer)

    def token_count(self, prompt: str) -> int:
        """Tokens of the prompt for the first text encoder, its start and end marks included (call from one thread:
        the server's event loop)."""
        return len(self._counter(prompt, truncation=False).input_ids)

    @property
    def max_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def render(self, served: Served | None, request: Request) -> list[Image.Image]:
        """The request's images with `served`'s LoRA (None: the base model alone), one per seed. Each is made on its
        own, not in a batch: a batch's arithmetic differs in the last bits, and an image must come out the same when
        asked for again by its seed alone."""
        if request.refine and self.refiner is None:
            raise ValueError("this renderer has no refiner")
        with self._lock:
            self._activate(served)
            return [self._image(request, seed) for seed in request.seeds]

    def pngs(self, served: Served | None, request: Request) -> list[bytes]:
        """The request's images as PNGs, screened, then marked, then signed with Content Credentials when the
        renderer has credentials (sd_tasks.safety); NotServable (422) when the screen flags any of them: none is
        sent, and the reason says why."""
        images = self.render(served, request)
        reasons = [reason for reason in screen_all(self.screen, images) if reason]
        if reasons:
            raise NotServable(422, f"withheld: {len(reasons)} of {len(images)} images flagged by the screen "
                                   f"({reasons[0]})")
        pngs = [png(mark(image)) for image in images]
        if self.credentials is None:
            return pngs
        model, version = (served.model, served.version) if served else (self.base_model, "base")
        return [self.credentials.sign(data, model, version) for data in pngs]

    def _image(self, request: Request, seed: int) -> Image.Image:
        generator = torch.Generator().manual_seed(seed)
        common = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, generator=generator,
                      num_inference_steps=request.steps, guidance_scale=request.guidance)
        if not request.refine:
            return self.pipe(**common, width=request.width, height=request.height).images[0]
        latents = self.pipe(**common, width=request.width, height=request.height, denoising_end=REFINE_FROM,
                            output_type="latent").images
        return self.refiner(**common, image=latents, denoising_start=REFINE_FROM).images[0]

    async def on_its_thread(self, work):
        """`work()` on the renderer's own thread, awaited from an event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, work)

    def load(self, served: Served) -> str:
        """The adapter of `served` in the pipeline (loaded once, then only marked recently used); its name."""
        name = adapter_name(served)
        with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                self.counts["adapter_hits"] += 1
                return name
            if not self._hotswap_into_oldest(name, served):
                while len(self.loaded) >= self.max_adapters:
                    self.unload(next(iter(self.loaded)))
                self._load_weights(served, slot=name, hotswap=False)
                self._slots[name] = name
                self.counts["adapter_loads"] += 1
                if self.compile_unet and self.counts["adapter_loads"] == 1:  # after the first load, as diffusers asks
                    self.pipe.unet.compile_repeated_blocks(fullgraph=True)
            self.loaded[name] = served
            return name

    def _hotswap_into_oldest(self, name: str, served: Served) -> bool:
        """With hotswap on and every slot taken, the least recently used adapter's slot takes `served`'s weights in
        place (the slot keeps its first name); only between UNet-only adapters, as diffusers can swap no other."""
        if not (self.hotswap and len(self.loaded) >= self.max_adapters and unet_only(served.lora)):
            return False
        oldest, old = next(iter(self.loaded.items()))
        if not unet_only(old.lora):
            return False
        slot = self._slots.pop(oldest)
        del self.loaded[oldest]
        self._load_weights(served, slot, hotswap=True)
        self._slots[name] = slot
        self.counts["adapter_hotswaps"] += 1
        return True

    def _load_weights(self, served: Served, slot: str, hotswap: bool) -> None:
        try:
            self.pipe.load_lora_weights(str(served.lora), weight_name=LORA_WEIGHTS, adapter_name=slot,
                                        hotswap=hotswap)
        except Exception:  # half loaded or half replaced: the slot goes, never to be drawn with
            if any(slot in names for names in self.pipe.get_list_adapters().values()):
                self.pipe.delete_adapters(slot)
            raise

    def unload(self, name: str) -> None:
        with self._lock:
            if self.loaded.pop(name, None) is not None:
                self.pipe.delete_adapters(self._slots.pop(name))
                self.counts["adapter_evictions"] += 1

    def _activate(self, served: Served | None) -> None:
        if served is None:
            if self.loaded:
                self.pipe.disable_lora()
            return
        name = self.load(served)
        self.pipe.enable_lora()
        self.pipe.set_adapters([self._slots[name]])


class LocalBackend:
    """The API's images made in this process (the `serve` step): one batch at a time, in a worker thread."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer
        self.base_model, self.counts = renderer.base_model, renderer.counts
        self.native_size, self.max_tokens = renderer.native_size, renderer.max_tokens
        self.refiner = renderer.refiner is not None
        self.signs = renderer.credentials is not None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def token_count(self, prompt: str) -> int:
        return self.renderer.token_count(prompt)

    async def render(self, served: Served, request: Request) -> tuple[list[bytes], str]:
        return await self.renderer.on_its_thread(lambda: (self.renderer.pngs(served, request), self.replica))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
