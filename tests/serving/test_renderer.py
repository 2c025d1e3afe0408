"""The renderer's adapter swapping (sd_tasks.serving.renderer) in this process on the tiny SDXL: an LRU of adapters,
and with a hotswap rank, UNet-only adapters swapped into the least recently used one's place, drawing exactly what a
fresh load draws; an adapter with text-encoder layers is loaded beside the others instead."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import torch
from safetensors.torch import save_file

from sd_tasks.serving.champions import Champions
from sd_tasks.serving.renderer import LocalBackend, Renderer, Request, adapter_name, unet_only

REQUEST = Request("a photo of sks dog", "", (3, 4), 2, 5.0, 64, 64)


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def test_a_hotswapped_adapter_draws_what_a_freshly_loaded_one_draws(versions, models, tmp_path):
    champions = Champions(tmp_path / "adapters", refresh_seconds=0)
    rex, fox = champions.served("rex"), champions.served("fox")  # step 2 and step 4 of one training run
    swapping = Renderer(models["sdxl"], max_adapters=1, hotswap_rank=8)
    before = pixels(swapping.render(rex, REQUEST))
    after = pixels(swapping.render(fox, REQUEST))
    assert swapping.counts["adapter_hotswaps"] == 1 and swapping.counts["adapter_loads"] == 1
    assert list(swapping.loaded) == [adapter_name(fox)] and len(swapping.pipe.get_list_adapters()["unet"]) == 1
    fresh = Renderer(models["sdxl"], max_adapters=1)
    assert all(np.array_equal(a, b) for a, b in zip(after, pixels(fresh.render(fox, REQUEST))))
    assert not all(np.array_equal(a, b) for a, b in zip(after, before))  # another adapter drew it
    again = pixels(swapping.render(rex, REQUEST))  # and back, in place again
    assert swapping.counts["adapter_hotswaps"] == 2 and all(np.array_equal(a, b) for a, b in zip(again, before))


def test_without_hotswap_the_least_recently_used_adapter_leaves(versions, models, tmp_path):
    champions = Champions(tmp_path / "adapters", refresh_seconds=0)
    rex, fox = champions.served("rex"), champions.served("fox")
    renderer = Renderer(models["sdxl"], max_adapters=1)
    first = pixels(renderer.render(rex, REQUEST))
    renderer.render(fox, REQUEST)
    assert list(renderer.loaded) == [adapter_name(fox)] and renderer.counts["adapter_evictions"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(pixels(renderer.render(rex, REQUEST)), first))
    base = pixels(renderer.render(None, REQUEST))  # the base model alone, adapters kept but off
    assert not all(np.array_equal(a, b) for a, b in zip(base, first)) and renderer.loaded


def test_only_a_unet_only_lora_counts_as_hot_swappable(tmp_path):
    for name, keys, expected in [("unet", ["unet.down.lora_A.weight"], True),
                                 ("both", ["unet.down.lora_A.weight", "text_encoder.q.lora_A.weight"], False)]:
        (tmp_path / name).mkdir()
        save_file({k: torch.zeros(2) for k in keys}, tmp_path / name / "pytorch_lora_weights.safetensors")
        assert unet_only(tmp_path / name) is expected


def test_concurrent_requests_reach_torch_from_one_thread_only(versions, models, tmp_path):
    """OpenMP keeps a team of threads per thread that calls into torch, and idle teams spin: requests rendered from a
    pool of threads cut four clients' throughput to less than half of one client's on 2 cores (bench/serve.py)."""
    served = Champions(tmp_path / "adapters", refresh_seconds=0).served("rex")
    renderer = Renderer(models["sdxl"])
    backend, callers, render = LocalBackend(renderer), set(), renderer.render

    def recorded(*args):
        callers.add(threading.get_ident())
        return render(*args)

    renderer.render = recorded

    async def burst():
        return await asyncio.gather(*(backend.render(served, REQUEST) for _ in range(6)))

    answers = asyncio.run(burst())
    assert len(answers) == 6 and all(len(pngs) == 2 for pngs, _ in answers)
    assert len(callers) == 1 and threading.get_ident() not in callers  # one thread, not the event loop's
