"""A tiny image tokenizer for the demo: vector quantisation of image patches with a k-means codebook.

An image (3, H, W) in [-1, 1] is cut into non-overlapping p x p patches in raster order; each patch
(3 * p * p values) becomes the index of its nearest codebook row (squared L2). `decode` pastes the
codebook rows back, so decode(encode(x)) is x with every patch replaced by its centroid. The
codebook is fitted by seeded, count-weighted k-means (k-means++ seeds, Lloyd iterations) in torch, so the
result is a function of (images, codebook_size, patch, seed) on a given machine.

Saved as `codebook.safetensors` (the (K, 3 * p * p) fp32 codebook) + `config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from t2i_ds.atomic import atomic_path, atomic_write_text

CONFIG = "config.json"
CODEBOOK = "codebook.safetensors"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), C * p * p), patches in raster order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: (B, gh * gw, C * p * p) -> (B, C, gh * p, gw * p)."""
    B, _, D = patches.shape
    gh, gw = grid
    C = D // (p * p)
    x = patches.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(B, C, gh * p, gw * p)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N,) int64 index of the nearest centroid (squared L2)."""
    d = (centroids * centroids).sum(1)[None] - 2 * x @ centroids.T  # (N, K); ||x||^2 is constant per row
    return d.argmin(1)


def kmeans_plus_plus(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of weighted points (N, D), (N,) -> (k, D): draws with probability ~ w * d^2."""
    centroids = [x[torch.multinomial(w, 1, generator=gen)][0]]
    d2 = ((x - centroids[0]) ** 2).sum(1)  # (N,) squared distance to the nearest chosen centroid
    for _ in range(1, k):
        p = w * d2
        c = x[torch.multinomial(p if p.sum() > 0 else w, 1, generator=gen)][0]  # fewer distinct points than k
        centroids.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted Lloyd's algorithm from k-means++ seeds, at most `iters` rounds, stopping early once no point changes
    cluster (a fixed point); an empty cluster keeps its previous centroid."""
    centroids = kmeans_plus_plus(x, w, k, gen)  # (k, D)
    previous = None
    for _ in range(iters):
        assign = nearest(x, centroids)  # (N,)
        if previous is not None and torch.equal(assign, previous):
            break  # converged: another round would compute the same centroids
        previous = assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, x * w[:, None])  # (k, D)
        mass = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w)  # (k,)
        filled = mass > 0
        centroids[filled] = sums[filled] / mass[filled, None]
    return centroids


class PatchKMeansTokenizer:
    """ImageTokenizer (t2i_ds.data.tokenizers) with a k-means codebook over p x p patches."""

    def __init__(self, codebook: torch.Tensor, patch: int, image_size: int):
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}")
        if codebook.ndim != 2 or codebook.shape[1] != 3 * patch * patch:
            raise ValueError(f"codebook must be (K, {3 * patch * patch}), got {tuple(codebook.shape)}")
        self.codebook = codebook.float().contiguous()  # (K, 3 * p * p), values in [-1, 1]
        self.patch = patch
        self.image_size = image_size
        self.codebook_size = codebook.shape[0]
        self.grid = (image_size // patch, image_size // patch)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int, patch: int, seed: int, iters: int = 30) -> "PatchKMeansTokenizer":
        """Fit the codebook on (B, 3, S, S) images in [-1, 1].

        Synthetic images repeat patches heavily (a few thousand distinct ones in 10^5), so k-means runs
        on the distinct patches weighted by their counts: the same objective, far fewer points.
        """
        x = patchify(images.float(), patch).reshape(-1, 3 * patch * patch)  # (B * T, D)
        distinct, counts = torch.unique(x, dim=0, return_counts=True)  # (N, D), (N,)
        gen = torch.Generator().manual_seed(seed)
        return cls(kmeans(distinct, counts.float(), codebook_size, iters, gen), patch, images.shape[-1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] -> (B, T) int64 codes."""
        if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, got {tuple(images.shape)}")
        x = patchify(images.float(), self.patch)  # (B, T, D)
        # synthetic images repeat patches heavily: the distances of the distinct ones only, (N, K) with N << B * T
        distinct, inverse = torch.unique(x.flatten(0, 1), dim=0, return_inverse=True)
        return nearest(distinct, self.codebook.to(x.device))[inverse].view(x.shape[:2])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 codes -> (B, 3, S, S) float in [-1, 1] (the centroids, no re-quantisation)."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected (B, {self.tokens_per_image}) codes, got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        patches = self.codebook.to(codes.device)[codes]  # (B, T, D)
        return unpatchify(patches, self.patch, self.grid).clamp(-1, 1)

    def save(self, directory: str | os.PathLike) -> None:
        """Write codebook + config, each through a temporary file and an atomic rename."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": "patch_kmeans", "patch": self.patch, "image_size": self.image_size, "codebook_size": self.codebook_size}
        with atomic_path(directory / CODEBOOK) as tmp:
            save_file({"codebook": self.codebook}, str(tmp))
        atomic_write_text(directory / CONFIG, json.dumps(config, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PatchKMeansTokenizer":
        directory = Path(directory)
        config = json.loads((directory / CONFIG).read_text())
        if config.get("kind") != "patch_kmeans":
            raise ValueError(f"{directory / CONFIG} does not describe a patch k-means tokenizer: {config}")
        return cls(load_file(str(directory / CODEBOOK))["codebook"], config["patch"], config["image_size"])
