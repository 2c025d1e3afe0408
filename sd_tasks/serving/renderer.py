"""One warm SDXL base per process, and the LoRA adapters swapped into it per request.

Up to `max_adapters` adapters stay loaded in the pipeline (an LRU: the least recently used is deleted to make room),
each under the name `<model>-v<version>`, so a request for a subject served a moment ago only switches adapters
(`set_adapters`), and one for a new version loads its file once. One image batch is generated at a time: the
pipeline's adapters are process state.
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from sd_tasks.models.loading import load_pipeline
from sd_tasks.serving.champions import Served
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


class Renderer:
    """The base pipeline and its adapters; `render` is safe to call from several threads (one runs at a time)."""

    def __init__(self, base_model: str, dtype: str = "float32", max_adapters: int = 4):
        self.base_model = base_model
        self.pipe = load_pipeline(base_model, dtype)
        self.max_adapters = max_adapters
        self.loaded: OrderedDict[str, Served] = OrderedDict()
        self.counts = {"adapter_loads": 0, "adapter_hits": 0, "adapter_evictions": 0}
        self._lock = threading.Lock()
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

    def render(self, served: Served | None, request: Request) -> list[Image.Image]:
        """The request's images with `served`'s LoRA (None: the base model alone), one per seed. Each is made on its
        own, not in a batch: a batch's arithmetic differs in the last bits, and an image must come out the same when
        asked for again by its seed alone."""
        with self._lock:
            self._activate(served)
            return [self.pipe(prompt=request.prompt, negative_prompt=request.negative_prompt,
                              generator=torch.Generator().manual_seed(seed), num_inference_steps=request.steps,
                              guidance_scale=request.guidance, width=request.width, height=request.height).images[0]
                    for seed in request.seeds]

    def _activate(self, served: Served | None) -> None:
        if served is None:
            if self.loaded:
                self.pipe.disable_lora()
            return
        name = f"{served.model}-v{served.version}"
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.counts["adapter_hits"] += 1
        else:
            while len(self.loaded) >= self.max_adapters:
                oldest, _ = self.loaded.popitem(last=False)
                self.pipe.delete_adapters(oldest)
                self.counts["adapter_evictions"] += 1
            self.pipe.load_lora_weights(str(served.lora), weight_name=LORA_WEIGHTS, adapter_name=name)
            self.loaded[name] = served
            self.counts["adapter_loads"] += 1
        self.pipe.enable_lora()
        self.pipe.set_adapters([name])
