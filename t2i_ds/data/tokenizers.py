"""The two tokenizers of a sample: the caption tokenizer, and the image-tokenizer interface.

Text: any Hugging Face tokenizer from a local path; GPT-NeoX's BPE by default. Never downloads: the path must be a
`tokenizer.json` file or a directory saved by `save_pretrained`. No special tokens are added (the Vocab adds
`<doc> <text> ... </text>` itself).

Images: `ImageTokenizer` is the interface shared by MoVQGAN (diffusers `VQModel`, data/movqgan.py) and the demo's
tokenizers (demo/mask_tokenizer.py, demo/tokenizer.py). Images are float tensors (B, 3, H, W) in [-1, 1]; codes are
int64 (B, tokens_per_image), each in [0, codebook_size): grid_h * grid_w in raster order (MoVQGAN, patch k-means), or
a tokenizer's own header tokens first (the demo's palette-mask: one palette token, then the grid). `decode` maps codes
straight to pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# The NeoX-20B BPE shipped with the package (50,277 ids; provenance in t2i_ds/assets/NEOX_BPE_PROVENANCE.md).
DEFAULT_TEXT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "neox-20b-bpe.json"


class TextTokenizer:
    """`encode_batch(texts) -> list[list[int]]` and `vocab_size` over a local Hugging Face tokenizer."""

    def __init__(self, path: str | os.PathLike | None = None):
        path = Path(path) if path else DEFAULT_TEXT_TOKENIZER
        if not path.exists():
            raise FileNotFoundError(f"text tokenizer not found at {path} (a tokenizer.json file or a directory)")
        self.path = str(path)
        self.name = path.stem if path.is_file() else path.name
        if path.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(path))
            self._hf = None
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._fast = None
            self.vocab_size = len(self._hf)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids))
        return self._hf.decode(list(ids))

    def describe(self) -> dict:
        """What the shard manifest records about the text tokenizer."""
        return {"name": self.name, "path": self.path, "vocab_size": self.vocab_size}


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int  # number of codes (MoVQGAN: 16,384)
    grid: tuple[int, int]  # tokens per side (MoVQGAN at 256 px: (32, 32))
    image_size: int  # square input resolution in pixels (MoVQGAN: 256)

    @property
    def tokens_per_image(self) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, tokens_per_image) int64 codes (grid_h * grid_w for a plain grid)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, tokens_per_image) int64 codes -> (B, 3, H, W) float in [-1, 1]."""
        ...
