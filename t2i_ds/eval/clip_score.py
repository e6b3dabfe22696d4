"""CLIP score of generated images against their captions, from a local CLIP model (never downloaded).

    score(image, caption) = 100 * max(cos(E_image, E_text), 0)          (Hessel et al. 2021; torchmetrics' CLIPScore)

averaged over the images. E_image and E_text are the projected embeddings of transformers' `CLIPModel`
(`get_image_features`, `get_text_features`), loaded with its `CLIPProcessor` from a local `save_pretrained`
directory (e.g. a copy of openai/clip-vit-large-patch14); the processor's own resize, crop and normalisation are
applied to the uint8 PNG pixels, and captions are truncated to the model's 77 tokens. The report names the model
directory, the sha256 of its weight files and the processor class, because CLIP scores of different CLIP models
are not comparable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class ClipScorer:
    """A local CLIP model and processor; `scores(images, captions)` -> (B,) float64 CLIP scores."""

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(model_dir)
        weights = sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)) if path.is_dir() else []
        if not weights:
            raise FileNotFoundError(
                f"CLIP model not found at {path}: pass a local directory written by CLIPModel/CLIPProcessor "
                "save_pretrained (config.json, weights, tokenizer and preprocessor files); this command never downloads it")
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.path, self.device = path, torch.device(device)
        h = hashlib.sha256()
        for w in weights:  # identity of the weights, in a fixed file order
            with open(w, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        self.sha256 = h.hexdigest()

    def scores(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> torch.Tensor:
        """uint8 (H, W, 3) images and their captions -> (B,) float64 scores in [0, 100]."""
        return 100.0 * self.cosines(images, captions).clamp(min=0)

    @torch.no_grad()
    def cosines(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> torch.Tensor:
        """(B,) float64 cosine similarities of the image and caption embeddings."""
        context = self.model.config.text_config.max_position_embeddings  # 77 for every released CLIP
        inputs = self.processor(text=list(captions), images=list(images), return_tensors="pt", padding=True,
                                truncation=True, max_length=context)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))  # (B, P)
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))  # (B, P)
        return torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1).cpu()  # (B,)

    def describe(self) -> dict:
        return {"clip_model": str(self.path.resolve()), "clip_sha256": self.sha256,
                "clip_processor": type(self.processor.image_processor).__name__,
                "clip_score_formula": "mean of 100 * max(cos(image embedding, text embedding), 0); captions truncated to the "
                              "model's context"}


def _embedding(out) -> torch.Tensor:
    """transformers 4.x returns the projected embedding; 5.x an output whose pooler_output is that embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
