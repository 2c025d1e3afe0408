"""The LoRA in kohya's format, which A1111 and ComfyUI load: `lora_unet_*`, `lora_te1_*`, `lora_te2_*` keys with
`.lora_down.weight`, `.lora_up.weight` and `.alpha`.

Both look a text encoder's layers up as `lora_te1_text_model_encoder_layers_*` (te2 likewise) and ignore any other
name without a word. transformers 5's CLIPTextModel (text encoder 1) has no `text_model` level, so its peft names
get it back here; diffusers, which loads either, drops it again.

A DoRA LoRA gets no kohya file. peft's magnitude vector holds one number per output row of a layer (the norm of the
row, over the inputs); kohya's `dora_scale`, as ComfyUI applies it (comfy/weight_adapter/base.py weight_decompose),
holds one per input column, norms taken over the outputs. The two decompositions give different weights and one
cannot be computed from the other, so such a file would load in ComfyUI as something that was never trained.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sd_tasks.training.checkpoint_files import KOHYA_WEIGHTS

DORA_REASON = ("none: DoRA's magnitudes (peft: per output row) have no kohya/ComfyUI form (dora_scale: per input "
               "column); load the diffusers file")


def write(folder: Path, states: dict, alpha: float, dora: bool) -> str:
    """Write the kohya file of these LoRA states (by diffusers name: unet, text_encoder, text_encoder_2) into
    `folder`; return what the checkpoint's info says about it: its name, or why there is none."""
    from safetensors.torch import save_file

    if dora:
        return DORA_REASON
    save_file(state_dict(states, alpha), folder / KOHYA_WEIGHTS)
    return KOHYA_WEIGHTS


def state_dict(states: dict, alpha: float) -> dict:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"{name}.{_module(name, k)}": v for name, state in states.items()
                                         for k, v in state.items()})
    # diffusers writes alpha = rank (scale 1); the scale we trained with is alpha / rank
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def _module(component: str, key: str) -> str:
    """A peft key of `component` as A1111 and ComfyUI name its layer: a text encoder's under `text_model.`."""
    if component == "unet" or key.startswith("text_model."):
        return key
    return f"text_model.{key}"
