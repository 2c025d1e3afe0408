"""Random-weight models in the real formats, so every code path runs offline and on a CPU.

`tiny` is an SDXL pipeline small in width but faithful in shape: a VAE that downsamples 8x to 4 latent channels,
two CLIP text encoders whose hidden sizes add up to the UNet's cross-attention size, and a UNet that takes SDXL's
`text_time` embedding of the pooled text plus six time ids. `full` has SDXL-base's real dimensions (random weights,
about 3.5B parameters) for GPU benchmarks without a model hub. The evaluators are a CLIP model and a ViT (the DINO
architecture), and the captioner a BLIP model, in their transformers formats. Production ids (stabilityai/stable-diffusion-xl-base-1.0,
openai/clip-vit-large-patch14, facebook/dino-vits16) load through the same code as these directories.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.storage import write_dir

SIZES = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                          projection_dim=32),
        text_encoder_2=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                            projection_dim=32),
    ),
    # stabilityai/stable-diffusion-xl-base-1.0's dimensions.
    "full": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 1280, norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768, hidden_act="quick_gelu"),
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            projection_dim=1280, hidden_act="gelu"),
    ),
}


@dataclass
class TinyModelConfig:
    """Write an SDXL pipeline with random weights (and optionally tiny CLIP and DINO evaluators)."""

    output: str = option("directory for the diffusers-format SDXL pipeline", positional=True)
    size: str = option("tiny (tests, demo) or full (SDXL-base dimensions, for GPU benchmarks)", "tiny")
    evaluators: str | None = option("also write tiny evaluators here: <dir>/clip and <dir>/dino", None)
    captioner: str | None = option("also write a tiny BLIP captioning model here", None)
    seed: int = option("seed for the random weights", 0, at_least=0, at_most=2**31 - 1)


def run(config: TinyModelConfig) -> dict:
    import torch

    if config.size not in SIZES:
        from sd_tasks.core.errors import StepError

        raise StepError(f"--size {config.size!r}: choose one of {', '.join(SIZES)}")
    torch.manual_seed(config.seed)
    with write_dir(config.output) as out:
        build_sdxl(SIZES[config.size]).save_pretrained(out)
    result = {"sdxl": config.output, "size": config.size}
    if config.evaluators:
        with write_dir(f"{config.evaluators}/clip") as out:
            save_clip(out)
        with write_dir(f"{config.evaluators}/dino") as out:
            save_dino(out)
        result |= {"clip": f"{config.evaluators}/clip", "dino": f"{config.evaluators}/dino"}
    if config.captioner:
        with write_dir(config.captioner) as out:
            save_blip(out)
        result["captioner"] = config.captioner
    return result


def build_sdxl(dims: dict):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, addition_embed_type="text_time", use_linear_projection=True, **dims["unet"]
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **dims["vae"],
    )
    tokenizer = byte_level_tokenizer()
    text = token_ids(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, **dims["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, **dims["text_encoder_2"]))
    # SDXL base's scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=byte_level_tokenizer(), unet=unet, scheduler=scheduler,
    )


def byte_level_tokenizer():
    """A CLIP tokenizer over single bytes: no merges, so every character is a token. Good enough to tell prompts
    apart, and it needs no vocabulary download. End-of-text is the highest id, as in CLIP's real vocabulary."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        # Positional paths: transformers 5 ignores vocab_file=/merges_file= keywords.
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def token_ids(tokenizer) -> dict:
    """A CLIP text config's vocabulary settings matching `tokenizer`."""
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_clip(out: Path, image_size: int = 32) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = byte_level_tokenizer()
    text = dict(**token_ids(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)


def save_dino(out: Path, image_size: int = 32) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37,
                       num_attention_heads=4, num_hidden_layers=2)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)


CAPTION_WORDS = "a an the photo picture of dog cat toy on in with sitting lying grass sofa floor red blue white black"


def save_blip(out: Path, image_size: int = 32) -> None:
    """A BLIP captioner (Salesforce/blip-image-captioning-* architecture) over a small word-piece vocabulary."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CAPTION_WORDS.split()]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.txt").write_text("\n".join(words))
        tokenizer = BertTokenizer(str(Path(tmp, "vocab.txt")), bos_token="[CLS]")
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                encoder_hidden_size=32, bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2)
    torch.manual_seed(0)  # the same random captioner every time
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(out)
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
