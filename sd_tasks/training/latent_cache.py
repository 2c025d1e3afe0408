"""The encode cache in memory, as training reads it: per image its latent moments, text embeddings and SDXL time
ids, in batches whose order depends on the seed alone."""
from __future__ import annotations

import random
from collections.abc import Callable

import torch

from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import join, read_dir
from sd_tasks.data import manifest as manifests
from sd_tasks.models import loading


class LatentCache:
    """The encode cache in memory: per image its latent moments, text embeddings and SDXL time ids."""

    def __init__(self, uri: str, token_ids: Callable[[str], dict] | None = None):
        """`token_ids` (a caption's token ids per text encoder) when the text encoders train: each batch then carries
        them, to be encoded again with gradients."""
        from safetensors.torch import load_file

        manifest = manifests.load_cache(uri)
        shards = {name: load_file(read_dir(join(uri, name), whole=True) / "latents.safetensors")
                  for name in manifest["shards"]}
        self.scaling_factor = manifest["scaling_factor"]
        self.items = [
            {
                **{t: shards[r["shard"]][f"{r['key']}.{t}"].float()
                   for t in ("latent_moments", "prompt_embeds", "pooled_prompt_embeds")},
                "time_ids": loading.sdxl_time_ids(r["original_size"], r["crop_top_left"], r["target_size"]),
                **(token_ids(r["caption"]) if token_ids else {}),
            }
            for r in manifest["records"]
        ]
        if not self.items:
            raise StepError(f"{uri}: the encode cache holds no images")

    def batches(self, batch_size: int, seed: int, skip: int = 0):
        """Endless shuffled epochs; a batch only mixes images of one bucket (one latent shape). The order depends on
        the seed alone, so a resumed run skips the batches it already saw and continues exactly where it was."""
        rng = random.Random(seed)
        while True:
            order = list(range(len(self.items)))
            rng.shuffle(order)
            by_shape: dict[tuple, list[int]] = {}
            for i in order:
                by_shape.setdefault(tuple(self.items[i]["latent_moments"].shape), []).append(i)
            chunks = [ids[j:j + batch_size] for ids in by_shape.values() for j in range(0, len(ids), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                if skip:
                    skip -= 1
                    continue
                yield {k: torch.stack([self.items[i][k] for i in chunk]) for k in self.items[0]}
