"""What the scores measure: CLIP-T against the prompt without the identifier, DINO on its evaluation view."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sd_tasks.evaluation import evaluate
from sd_tasks.evaluation.metrics import ClipEmbedder, DinoEmbedder, evaluation_view


@pytest.mark.parametrize("prompt, expected", [
    ("a sks dog in the jungle", "a dog in the jungle"),
    ("sks dog", "dog"),
    ("a photo of a sks  dog, sksy style", "a photo of a dog, sksy style"),  # a word that merely starts with it stays
    ("a dog next to sks", "a dog next to"),
    ("a dog", "a dog"),
])
def test_clip_t_scores_the_prompt_without_the_identifier(prompt, expected):
    assert evaluate.clip_t_texts([prompt], "sks") == [expected]
    assert evaluate.clip_t_texts([prompt], None) == [prompt]


def test_an_evaluation_scores_each_image_against_its_prompt_without_the_identifier(prepared, models, tmp_path):
    prompts = ["a sks dog in the jungle", "a red sks dog"]
    evaluate.run(evaluate.EvaluateConfig(
        checkpoint=None, base_model=models["sdxl"], output=str(tmp_path / "base"), identifier="sks",
        instance_images=str(prepared / "resized"), prompts=prompts, clip_model=models["clip"],
        dino_model=models["dino"], images_per_prompt=2, num_inference_steps=2))
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert metrics["clip_t_texts"] == ["a dog in the jungle", "a red dog"] and metrics["prompts"] == prompts
    clip = ClipEmbedder(models["clip"])
    for j, text in enumerate(["a dog in the jungle", "a red dog"]):
        images = [Image.open(tmp_path / "base" / "images" / f"p{j:02d}-{k}.png") for k in range(2)]
        expected = (clip.images(images) @ clip.texts([text]).T).ravel().tolist()
        assert metrics["per_image"]["clip_t"][j] == pytest.approx(expected, abs=1e-5)
        with_identifier = (clip.images(images) @ clip.texts([prompts[j]]).T).ravel().tolist()
        assert metrics["per_image"]["clip_t"][j] != pytest.approx(with_identifier, abs=1e-5)


def test_dino_sees_the_centre_of_a_wide_photo_not_a_squashed_one(models):
    """DINO's evaluation resizes the shorter side and crops the centre: a wide photo whose centre is a square image
    is seen as that image, whatever lies at its sides."""
    rng = np.random.default_rng(0)
    square = Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8"))
    wide = Image.fromarray((rng.random((256, 768, 3)) * 255).astype("uint8"))
    wide.paste(square, (256, 0))
    dino = DinoEmbedder(models["dino"])
    a, b = dino.images([square, wide])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)
    side = dino.processor.size["height"]
    view = evaluation_view(Image.new("RGB", (300, 100)), side)
    assert view.size == (side, side)
