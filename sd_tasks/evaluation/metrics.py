"""The DreamBooth paper's metrics: DINO and CLIP-I (subject fidelity: generated vs real images, mean pairwise
cosine similarity) and CLIP-T (prompt fidelity: each image vs its prompt). Evaluator ids are configuration:
openai/clip-vit-large-patch14 and facebook/dino-vits16 in production, tiny offline models in tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sd_tasks.models.model_refs import local_folder


class ClipEmbedder:
    def __init__(self, model_id: str):
        from transformers import CLIPModel, CLIPProcessor

        model_id = local_folder(model_id, "--clip-model")
        self.model = CLIPModel.from_pretrained(model_id).eval()
        self.processor = CLIPProcessor.from_pretrained(model_id)

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        out = self.model.get_image_features(**self.processor(images=images, return_tensors="pt"))
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(**inputs)
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)


class DinoEmbedder:
    """DINO ViT's [CLS] token, as in the DreamBooth paper, on DINO's evaluation view of an image: the shorter side
    resized to 256/224 of the model's input size, then the centre cropped to it (a non-square photo keeps its
    proportions instead of being squashed to a square by the image processor)."""

    def __init__(self, model_id: str):
        from transformers import AutoImageProcessor, AutoModel

        model_id = local_folder(model_id, "--dino-model")
        self.model = AutoModel.from_pretrained(model_id, add_pooling_layer=False).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_id)

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        side = self.processor.size.get("height") or self.processor.size["shortest_edge"]
        views = [evaluation_view(image, side) for image in images]
        out = self.model(**self.processor(images=views, return_tensors="pt"))
        return F.normalize(out.last_hidden_state[:, 0], dim=-1)


def evaluation_view(image, side: int):
    """DINO's evaluation transform before normalising: the shorter side to round(side * 256 / 224) (bicubic), then
    the centre side x side."""
    from PIL import Image

    image = image.convert("RGB")
    short = round(side * 256 / 224)
    width, height = image.size
    scale = short / min(width, height)
    image = image.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BICUBIC)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def mean_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per row of a: its mean cosine similarity with every row of b (one generated image against all the real
    ones); rows must be unit vectors. Their mean is the paper's mean pairwise similarity."""
    return (a @ b.T).mean(dim=1).tolist()


def matched_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine similarity of a[i] with b[i] (an image with its prompt, or with the same seed's image without the
    LoRA); rows must be unit vectors."""
    return (a * b).sum(dim=-1).tolist()
