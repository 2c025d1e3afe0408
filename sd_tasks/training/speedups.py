"""How the UNet runs during training, never what it computes: SDPA attention, channels-last and regional compile.

Why a module of its own: these are the GPU recipe's speed settings (issue 12, part 4). They must be applied in one
place, after the LoRA adapters exist (compile has to trace the adapters' layers, channels-last has to convert the
final weights) and before accelerate wraps the model, and each must give the plain run's LoRA to float tolerance
(tests/training/test_train_speedups.py). They are for CUDA but run on the CPU too, so that every path is tested here.

- SDPA: diffusers' UNet attention processors default to `AttnProcessor2_0`, which calls
  `torch.nn.functional.scaled_dot_product_attention` (flash or memory-efficient kernels on CUDA, no (tokens x tokens)
  matrix kept for the backward). `use_sdpa` checks every processor and sets `AttnProcessor2_0` where one is not,
  so no saved or patched model silently trains with the quadratic-memory `AttnProcessor`.
- channels-last (`--channels-last`): convolution weights in NHWC, the layout tensor-core convolutions want in bf16;
  each convolution's output follows its weights. Off by default until the GPU benchmark shows it helps.
- compile (`--compile`): `torch.compile` of the UNet's repeated blocks only (diffusers' `compile_repeated_blocks`:
  SDXL's 70 BasicTransformerBlocks, which hold all the attention and every LoRA layer). Blocks of one shape share a
  compiled graph, so compiling takes seconds, not the minutes of the whole UNet (the tiny model's forward and
  backward: about 30 s on a quiet 2-core CPU with a cold inductor cache). Each block is compiled in place, so the
  state dict and the checkpoints keep their keys and resuming is unchanged. On the CPU the tiny model gets slower
  (likely the per-call overhead, with kernels this small); off by default until the GPU benchmark shows it helps.
"""
from __future__ import annotations

import shutil
import sys

import torch

from sd_tasks.core.errors import StepError


def apply(unet, compile: bool = False, channels_last: bool = False) -> list[str]:
    """Set up `unet` (LoRA adapters already added) for training; return what was done, also printed to stderr."""
    done = [use_sdpa(unet)]
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if compile:
        done.append(compile_blocks(unet))
    print(f"speedups: {'; '.join(done)}", file=sys.stderr)
    return done


def use_sdpa(unet) -> str:
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = unet.attn_processors
    others = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, AttnProcessor2_0)})
    if others:  # set_attn_processor with one instance sets it on every attention layer
        unet.set_attn_processor(AttnProcessor2_0())
    return f"SDPA attention in {len(processors)} layers" + (f" (was {', '.join(others)})" if others else "")


def compile_blocks(unet) -> str:
    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        raise StepError("--compile on the CPU needs a C++ compiler (g++) for torch.compile; leave --compile off")
    blocks = [m for m in unet.modules() if type(m).__name__ in unet._repeated_blocks]
    if not blocks:
        raise StepError(f"--compile: {type(unet).__name__} has no repeated blocks to compile; leave --compile off")
    unet.compile_repeated_blocks()
    return f"torch.compile of {len(blocks)} {'/'.join(unet._repeated_blocks)}"
