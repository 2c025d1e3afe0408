"""Model FLOPs of one LoRA training step of the SDXL UNet, and model FLOPs utilisation (MFU).

The count is what one step executes, by torch.utils.flop_counter: the UNet's forward with the LoRA adapters, and
its backward as autograd runs it, which computes weight gradients only for the LoRA matrices (the frozen weights
get none) and stops at the first layer with an adapter (nothing before it needs a gradient). Gradient
checkpointing's recomputation is not counted (the model is counted without it), nor the optimizer, the loss or the
noise. On the meta device (shapes only: no weights are read or allocated), so the full-size UNet is counted in
seconds on any machine; attention is counted as its two matrix products, forward and backward, whichever SDPA
kernel runs it. MFU = FLOPs per step / seconds per step / the accelerator's peak FLOP/s at the training precision.
"""
from __future__ import annotations

H100_SXM_BF16_TFLOPS = 989.0  # dense (no sparsity); H100 PCIe: 756; H200: 989; A100: 312


def unet_step_flops(base_model: str, batch_size: int, resolution: int, rank: int = 4) -> float:
    """FLOPs of one training step of `base_model`'s UNet with rank-`rank` LoRA at `resolution` px."""
    import torch
    from diffusers import UNet2DConditionModel

    from sd_tasks.training.train import TrainConfig, add_lora

    config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    add_lora(unet, TrainConfig(cache="", output="", base_model=base_model, rank=rank))
    return count_step_flops(unet, batch_size, resolution)


def count_step_flops(unet, batch_size: int, resolution: int) -> float:
    """FLOPs of one forward and backward of `unet` (on its own device) on random inputs of the training shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if resolution % 8 or resolution <= 0 or batch_size <= 0:
        raise ValueError(f"resolution {resolution} (a positive multiple of 8) and batch size {batch_size} (> 0)")
    c, device = unet.config, unet.device
    b, side = batch_size, resolution // 8
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    latents = torch.randn(b, c.in_channels, side, side, device=device)
    timesteps = torch.full((b,), 500, device=device)
    text = torch.randn(b, 77, c.cross_attention_dim, device=device)
    cond = {"text_embeds": torch.randn(b, pooled, device=device),
            "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * b, dtype=torch.float32,
                                     device=device)}
    counter = FlopCounterMode(display=False)
    with counter:
        prediction = unet(latents, timesteps, text, added_cond_kwargs=cond).sample
        prediction.float().square().mean().backward()
    return float(counter.get_total_flops())


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the fraction of the accelerator's peak that the step's model FLOPs use."""
    if seconds_per_step <= 0 or peak_tflops <= 0:
        raise ValueError(f"seconds per step ({seconds_per_step}) and peak TFLOP/s ({peak_tflops}) must be > 0")
    return flops_per_step / seconds_per_step / (peak_tflops * 1e12)
