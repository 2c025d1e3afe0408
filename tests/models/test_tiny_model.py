"""The offline models are real diffusers/transformers models with SDXL's shapes."""
from __future__ import annotations

import json

import torch


def test_tiny_sdxl_is_faithful_in_shape_and_loads_in_stock_diffusers(models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.unet.config.addition_embed_type == "text_time"
    time_ids = 6 * pipe.unet.config.addition_time_embed_dim
    assert pipe.unet.config.projection_class_embeddings_input_dim == time_ids + pipe.text_encoder_2.config.projection_dim
    tok = pipe.tokenizer
    assert tok.model_max_length == 77 and tok.eos_token_id == len(tok) - 1
    assert tok("a photo of sks dog").input_ids != tok("a photo of sks cat").input_ids
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_evaluators_load_by_their_transformers_classes(models):
    from transformers import AutoModel, CLIPModel, CLIPProcessor

    assert CLIPModel.from_pretrained(models["clip"]).config.projection_dim == 32
    assert CLIPProcessor.from_pretrained(models["clip"]).tokenizer.model_max_length == 77
    assert type(AutoModel.from_pretrained(models["dino"])).__name__ == "ViTModel"


def test_full_size_config_matches_sdxl_base():
    from sd_tasks.models.tiny_model import SIZES

    unet = SIZES["full"]["unet"]
    assert unet["cross_attention_dim"] == SIZES["full"]["text_encoder"]["hidden_size"] + \
        SIZES["full"]["text_encoder_2"]["hidden_size"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == 2816
    assert json.dumps(unet["transformer_layers_per_block"]) == "[1, 2, 10]"
