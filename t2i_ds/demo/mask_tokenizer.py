"""The demo's default image tokenizer: a palette token, then one binary-mask token per image patch.

The demo's images are flat: one background colour, one shape colour, no anti-aliasing (t2i_ds.demo.shapes.render
paints a boolean mask). Such an image is exactly its two colours plus a binary mask, so this tokenizer codes
colour once per image and the shape patch by patch, apart:

    codes (B, 1 + gh * gw) int64, gh = gw = S / p
      codes[:, 0]       the palette token, in [0, P):   bg * n_fg + fg   (P = n_bg * n_fg colour pairs)
      codes[:, 1 + t]   patch t in raster order, in [P, P + M): P + the index of its p x p mask in the mask codebook

    codebook_size = P + M

Encoding an image (B, 3, S, S) in [-1, 1], its pixels rounded to uint8: the (background, foreground) palette pair that reconstructs it best
(summed over pixels, each pixel taking the nearer of the two colours, squared L2), each pixel's bit (1: nearer the
foreground), and per patch the mask codebook row nearest in Hamming distance (ties: the lower, i.e. more frequent,
row). Decoding paints each mask in the pair's colours, so decode(encode(x)) == x for a two-colour image whose
colours are in the palette and whose patch masks are in the codebook (the lossy cases: other colours snap to the
pair, unseen masks to their nearest row). A sampled sequence that puts a mask code at position 0 decodes with
palette pair 0; a palette code at a patch position decodes as the empty mask (all background).

`fit` takes the palette and the masks from training images: per image its most frequent colour is a background
and its second most frequent a foreground; the n_bg / n_fg most frequent of each and the M most frequent patch
masks (empty and full first) form the codebooks. Where the images have fewer, the rows are padded with repeats of
the first, which encoding never picks (ties go to the lower row). Compared with the patch k-means tokenizer
(t2i_ds.demo.tokenizer), whose codes tie colour and shape together and average the edge patches that tell shapes
apart, the shape survives the round trip at a vocabulary of a few hundred (benchmarks/results/demo_sizing.jsonl).

Saved as `palette_mask.safetensors` (backgrounds (n_bg, 3) and foregrounds (n_fg, 3) fp32 in [-1, 1], masks
(M, p * p) uint8) + `config.json`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from t2i_ds.atomic import atomic_path, atomic_write_text
from t2i_ds.demo.tokenizer import CONFIG, patchify, unpatchify

TENSORS = "palette_mask.safetensors"
KIND = "palette_mask"


def _colour_keys(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, S * S) int64 keys r * 65536 + g * 256 + b of the pixels rounded to uint8."""
    rgb = ((images.float() + 1) * 127.5).round().clamp(0, 255).long().flatten(2)  # (B, 3, S * S)
    return rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2]


def _key_colours(keys: torch.Tensor) -> torch.Tensor:
    """(N,) colour keys -> (N, 3) float in [-1, 1]."""
    return torch.stack([keys // 65536, keys // 256 % 256, keys % 256], 1).float() / 127.5 - 1.0


def _colour_counts(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> the distinct colour keys (N,), each pixel's colour (B, S * S) in [0, N), counts (B, N).

    Flat images hold a handful of colours, so everything per pixel is computed per distinct colour instead."""
    distinct, inverse = torch.unique(_colour_keys(images), return_inverse=True)  # (N,), (B, S * S); sorted keys
    counts = torch.zeros(len(images), len(distinct)).scatter_add_(1, inverse, torch.ones(inverse.shape))  # (B, N)
    return distinct, inverse, counts


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 3), (C, 3) -> (N, C) squared L2."""
    return ((a[:, None, :] - b[None]) ** 2).sum(-1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., D) 0 / 1 -> (...,) int64 keys sum_i bits_i 2^i (D <= 62: patches up to 7 x 7)."""
    return (bits.long() << torch.arange(bits.shape[-1])).sum(-1)


def _unpack_bits(keys: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `_pack_bits`: (N,) int64 -> (N, d) uint8."""
    return ((keys[:, None] >> torch.arange(d)) & 1).to(torch.uint8)


def _most_frequent(counter: Counter, n: int, first: list = ()) -> list:
    """`first`, then the most frequent other keys (ties: the smaller key), padded with repeats of row 0 up to n."""
    rest = [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])) if k not in first]
    rows = (list(first) + rest)[:n]
    if not rows:
        raise ValueError("no rows to fit the codebook on")
    return rows + [rows[0]] * (n - len(rows))


class PaletteMaskTokenizer:
    """ImageTokenizer (t2i_ds.data.tokenizers) for flat two-colour images: a palette token + p x p mask tokens."""

    def __init__(self, backgrounds: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor, patch: int, image_size: int):
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}")
        for name, colours in (("backgrounds", backgrounds), ("foregrounds", foregrounds)):
            if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
                raise ValueError(f"{name} must be (n, 3) with n > 0, got {tuple(colours.shape)}")
        if patch * patch > 62:
            raise ValueError(f"patch={patch} is too large: masks are packed into 64-bit keys (at most 7 x 7)")
        if masks.ndim != 2 or masks.shape[1] != patch * patch or len(masks) == 0:
            raise ValueError(f"masks must be (M, {patch * patch}) with M > 0, got {tuple(masks.shape)}")
        self.backgrounds = backgrounds.float().contiguous()  # (n_bg, 3) in [-1, 1]
        self.foregrounds = foregrounds.float().contiguous()  # (n_fg, 3) in [-1, 1]
        self.masks = masks.to(torch.uint8).contiguous()  # (M, p * p) of 0 / 1
        self.patch = patch
        self.image_size = image_size
        self.grid = (image_size // patch, image_size // patch)
        self.palette_size = len(backgrounds) * len(foregrounds)  # P
        self.codebook_size = self.palette_size + len(masks)  # P + M

    @property
    def tokens_per_image(self) -> int:
        return 1 + self.grid[0] * self.grid[1]  # the palette token + one per patch

    @classmethod
    def fit(cls, images: torch.Tensor, n_backgrounds: int, n_foregrounds: int, n_masks: int, patch: int) -> "PaletteMaskTokenizer":
        """Palette and mask codebook from (B, 3, S, S) training images in [-1, 1] (the rule in the module docstring)."""
        bgs, fgs = Counter(), Counter()
        for start in range(0, len(images), 1024):  # in batches to bound memory
            keys, _, counts = _colour_counts(images[start : start + 1024])  # (N,), _, (b, N)
            first = counts.argmax(1)  # (b,) the most frequent colour (ties: the smaller key)
            bgs.update(keys[first].tolist())
            second = counts.scatter(1, first[:, None], 0)  # (b, N) without it
            has = second.max(1).values > 0
            fgs.update(keys[second.argmax(1)[has]].tolist())
        backgrounds = _key_colours(torch.tensor(_most_frequent(bgs, n_backgrounds)))
        foregrounds = _key_colours(torch.tensor(_most_frequent(fgs or bgs, n_foregrounds)))
        p2 = patch * patch
        probe = cls(backgrounds, foregrounds, torch.zeros(1, p2, dtype=torch.uint8), patch, images.shape[-1])
        mask_counts = Counter()
        for start in range(0, len(images), 1024):  # in batches to bound memory
            _, bits = probe._palette_and_bits(images[start : start + 1024].float())  # (b, T, p * p)
            distinct, counts = torch.unique(_pack_bits(bits), return_counts=True)  # (N,), (N,)
            mask_counts.update(dict(zip(distinct.tolist(), counts.tolist())))
        rows = _most_frequent(mask_counts, n_masks, first=[0, 2**p2 - 1])  # empty and full first
        return cls(backgrounds, foregrounds, _unpack_bits(torch.tensor(rows), p2), patch, images.shape[-1])

    def _palette_and_bits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> palette codes (B,) in [0, P) and per-patch foreground bits (B, T, p * p) uint8."""
        keys, inverse, counts = _colour_counts(images)  # (N,), (B, S * S), (B, N)
        colours = _key_colours(keys)  # (N, 3)
        d_bg = _squared_distances(colours, self.backgrounds)  # (N, n_bg)
        d_fg = _squared_distances(colours, self.foregrounds)  # (N, n_fg)
        n_bg, n_fg = d_bg.shape[1], d_fg.shape[1]
        error = counts @ torch.minimum(d_bg[:, :, None], d_fg[:, None, :]).view(-1, n_bg * n_fg)  # (B, n_bg * n_fg)
        pair = error.argmin(1)  # (B,) = bg * n_fg + fg, ties: the lower pair
        bg, fg = pair // n_fg, pair % n_fg
        fg_colour = d_fg[:, fg].T < d_bg[:, bg].T  # (B, N): colour nearer the image's foreground than its background
        fg_bit = fg_colour.gather(1, inverse)  # (B, S * S)
        S = self.image_size
        bits = patchify(fg_bit.view(-1, 1, S, S).to(torch.uint8), self.patch)  # (B, T, p * p)
        return pair, bits

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] -> (B, 1 + T) int64 codes (palette token, then the patches' mask codes)."""
        if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, got {tuple(images.shape)}")
        pair, bits = self._palette_and_bits(images.float())
        # flat images repeat masks heavily: Hamming distances of the distinct ones only, (N, M) with N << B * T
        distinct, inverse = torch.unique(_pack_bits(bits), return_inverse=True)  # (N,), (B, T)
        a, m = _unpack_bits(distinct, bits.shape[-1]).float(), self.masks.float()  # (N, p * p), (M, p * p)
        hamming = a.sum(1, keepdim=True) + m.sum(1)[None] - 2 * a @ m.T  # (N, M)
        mask_codes = hamming.argmin(1)[inverse] + self.palette_size  # (B, T), ties: the lower row
        return torch.cat([pair[:, None], mask_codes], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T) int64 codes -> (B, 3, S, S) float in [-1, 1]: each mask painted in the palette pair's colours."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected (B, {self.tokens_per_image}) codes, got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        codes = codes.cpu()
        P, n_fg = self.palette_size, len(self.foregrounds)
        pair = torch.where(codes[:, 0] < P, codes[:, 0], 0)  # (B,); a mask code here: pair 0
        patches = codes[:, 1:] - P  # (B, T) mask rows; a palette code here (< 0): the empty mask
        bits = torch.where((patches >= 0)[..., None], self.masks[patches.clamp(min=0)], 0).float()  # (B, T, p * p)
        mask = unpatchify(bits, self.patch, self.grid)  # (B, 1, S, S)
        bg = self.backgrounds[pair // n_fg][:, :, None, None]  # (B, 3, 1, 1)
        fg = self.foregrounds[pair % n_fg][:, :, None, None]
        return bg + mask * (fg - bg)  # (B, 3, S, S)

    def describe_config(self) -> dict:
        return {"kind": KIND, "patch": self.patch, "image_size": self.image_size, "codebook_size": self.codebook_size,
                "backgrounds": len(self.backgrounds), "foregrounds": len(self.foregrounds), "masks": len(self.masks)}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the palette and masks + config, each through a temporary file and an atomic rename."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"backgrounds": self.backgrounds, "foregrounds": self.foregrounds, "masks": self.masks}
        with atomic_path(directory / TENSORS) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(directory / CONFIG, json.dumps(self.describe_config(), indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PaletteMaskTokenizer":
        directory = Path(directory)
        config = json.loads((directory / CONFIG).read_text())
        if config.get("kind") != KIND:
            raise ValueError(f"{directory / CONFIG} does not describe a palette-mask tokenizer: {config}")
        t = load_file(str(directory / TENSORS))
        return cls(t["backgrounds"], t["foregrounds"], t["masks"], config["patch"], config["image_size"])
