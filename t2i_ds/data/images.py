"""Image decoding and conversion for `prepare` (image tokenizers are found in data/image_tokenizers.py).

Every image becomes RGB, center-cropped to a square and resized to `image_size`, then a float tensor
(3, H, W) in [-1, 1] (the ImageTokenizer input range).
"""

from __future__ import annotations

import io
import numpy as np
import torch
from PIL import Image, ImageOps

SMALL_POLICIES = ("upscale", "skip")


class SkipImage(Exception):
    """An image `prepare` skips; args[0] is the reason counted in the summary."""


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> PIL image with EXIF orientation applied; `SkipImage('undecodable')` on failure."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncated files fail here, not later
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        raise SkipImage("undecodable") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparent images (RGBA, LA, P with transparency) are composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits first
        a = np.asarray(img, dtype=np.float64)
        a = (255 * a / max(a.max(), 1)).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F, P without transparency


def center_crop_resize(img: Image.Image, size: int, small: str = "upscale") -> Image.Image:
    """The central square of `img`, resized to (size, size); `SkipImage('too_small')` if small='skip'."""
    if small not in SMALL_POLICIES:
        raise ValueError(f"small={small!r} must be one of {SMALL_POLICIES}")
    w, h = img.size
    side = min(w, h)
    if side < size and small == "skip":
        raise SkipImage("too_small")
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    if side == size:
        return square
    resample = Image.Resampling.BICUBIC if side < size else Image.Resampling.LANCZOS  # antialias when shrinking
    return square.resize((size, size), resample)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image (H, W) -> float32 (3, H, W) in [-1, 1]."""
    a = np.array(img, dtype=np.uint8)  # (H, W, 3), a writable copy for torch
    return torch.from_numpy(a).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """float (3, H, W) in [-1, 1] -> RGB image (inverse of `to_tensor` up to rounding)."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] (an image tokenizer's decode) -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_and_prepare(data: bytes, size: int, small: str = "upscale") -> tuple[torch.Tensor, tuple[int, int], str]:
    """Encoded image -> ((3, size, size) tensor, original (width, height), original mode)."""
    img = decode_image(data)
    original, mode = img.size, img.mode
    return to_tensor(center_crop_resize(to_rgb(img), size, small)), original, mode
