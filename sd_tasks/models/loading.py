"""Loading SDXL's parts from a model reference, and the two-encoder text conditioning.

One loader for production ids and the offline tiny models: `base_model` is a model reference (sd_tasks.models.model_refs:
`id@sha` as `pin-models` wrote it, an unpinned hub id, or an absolute folder), loaded from its local folder.
"""
from __future__ import annotations

import torch

from sd_tasks.core.errors import StepError
from sd_tasks.models.model_refs import local_folder


def load_vae(base_model: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(local_folder(base_model), subfolder="vae")


def load_unet(base_model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(local_folder(base_model), subfolder="unet")


def load_text_encoders(base_model: str):
    """((tokenizer, tokenizer_2), (text_encoder, text_encoder_2)), frozen and in eval mode."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    base_model = local_folder(base_model)
    tokenizers = tuple(AutoTokenizer.from_pretrained(base_model, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
    encoders = (
        CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2"),
    )
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    return tokenizers, encoders


@torch.no_grad()
def encode_prompts(tokenizers, encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: penultimate hidden states of both encoders concatenated (batch, 77, 768 + 1280 in
    SDXL-base) and the projected pooled output of encoder 2 (batch, 1280)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection, the last encoder
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers: original (h, w), crop top-left (y, x), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_precision(name: str) -> str:
    """accelerate's mixed_precision for `auto`: bf16 on a CUDA GPU that has it (fp16 on older ones), none on the
    CPU, where half precision is slower and the demo's numbers stay exact."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # emulated bf16 is slow


INFERENCE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def inference_dtype(name: str) -> str:
    """The pipelines' dtype for `auto`: float16 on a CUDA GPU (SDXL's usual inference precision; its VAE upcasts
    itself to float32 to decode), float32 on the CPU."""
    if name not in INFERENCE_DTYPES:
        raise StepError(f"--dtype {name!r}: choose one of {', '.join(INFERENCE_DTYPES)}")
    if name != "auto":
        return name
    return "float16" if torch.cuda.is_available() else "float32"


def load_pipeline(base_model: str, dtype: str, vae: str | None = None):
    """The SDXL text-to-image pipeline in `dtype` on this machine's device, optionally with another VAE (a folder
    or id holding an AutoencoderKL, e.g. madebyollin/sdxl-vae-fp16-fix). The VAE decodes one image at a time
    (slicing): SDXL's VAE upcasts itself to float32 to decode, and four 1024 px images at once are several GB more
    than one, the difference between fitting a 24 GB GPU beside the UNet and not. diffusers' own invisible watermark
    is off: Dreamline marks what it generates itself (sd_tasks.safety.marking), and two marks disturb each other."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    torch_dtype = getattr(torch, dtype)
    extra = {"vae": AutoencoderKL.from_pretrained(local_folder(vae, "--vae"), torch_dtype=torch_dtype)} if vae else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(local_folder(base_model), torch_dtype=torch_dtype,
                                                     add_watermarker=False, **extra)
    pipe = pipe.to(device())
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_refiner(refiner_model: str, pipe):
    """The SDXL refiner (an img2img pipeline), sharing the base pipeline's VAE and second text encoder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        local_folder(refiner_model, "--refiner-model"), vae=pipe.vae, text_encoder_2=pipe.text_encoder_2,
        torch_dtype=pipe.unet.dtype, add_watermarker=False).to(pipe.device)
    refiner.set_progress_bar_config(disable=True)
    return refiner
