"""The image-tokenizer interface shared by MoVQGAN (diffusers `VQModel`) and the demo's patch k-means.

Images are float tensors (B, 3, H, W) in [-1, 1]; codes are int64 (B, grid_h * grid_w) in raster
order, each in [0, codebook_size). `decode` maps codes straight to pixels (no re-quantisation).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int  # number of codes (MoVQGAN: 16,384)
    grid: tuple[int, int]  # tokens per side (MoVQGAN at 256 px: (32, 32))
    image_size: int  # square input resolution in pixels (MoVQGAN: 256)

    @property
    def tokens_per_image(self) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, grid_h * grid_w) int64 codes."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid_h * grid_w) int64 codes -> (B, 3, H, W) float in [-1, 1]."""
        ...
