"""FID features: the clean-fid preprocessing (steps 1-4 of t2i_ds.eval.fid's protocol) and the Inception extractor (step 5).

Nothing is ever downloaded: the extractor is a local TorchScript file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

INCEPTION_SIZE = 299  # Inception-v3 input side; clean-fid resizes to it outside the network


def resizer_description(resize: int | None) -> str:
    """The preprocessing in words, logged beside every number."""
    lanczos = f"PIL LANCZOS to {resize}x{resize} (uint8); " if resize else ""
    return (f"center crop to the short side; {lanczos}clean-fid 'clean': PIL BICUBIC per channel (float32) "
            f"to {INCEPTION_SIZE}x{INCEPTION_SIZE}, clip [0, 255]")


def center_crop_square(img: Image.Image) -> Image.Image:
    """The central side x side square, side = min(W, H), offsets rounded as torchvision's center_crop."""
    w, h = img.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return img if (w, h) == (side, side) else img.crop((left, top, left + side, top + side))


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resizer: (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255], per channel."""
    channels = []
    for c in range(3):
        ch = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")  # float, so no quantisation
        channels.append(np.asarray(ch.resize((size, size), resample=Image.BICUBIC)).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


def preprocess(image: np.ndarray | Image.Image, resize: int | None) -> torch.Tensor:
    """One RGB image (uint8 (H, W, 3) or PIL) -> (3, 299, 299) float32 in [0, 255] (steps 2-4)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image), "RGB")
    img = center_crop_square(img.convert("RGB"))
    if resize:
        img = img.resize((resize, resize), Image.LANCZOS)  # same size: PIL returns a copy
    return torch.from_numpy(clean_resize(np.asarray(img, dtype=np.uint8))).permute(2, 0, 1)  # (3, 299, 299)


@runtime_checkable
class FeatureExtractor(Protocol):
    """(B, 3, 299, 299) float32 in [0, 255] -> (B, D) features; `describe()` goes into every report."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict:
        """At least `extractor` (a name or path) and `extractor_sha256` (identity of the weights)."""
        ...


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Identity of a weight file, recorded in every report."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TorchScriptExtractor:
    """A local TorchScript Inception (`inception-2015-12-05.pt`, or any module with its signature).

    call="layers": clean-fid's exact call, `module.layers((x - 128) / 128).reshape(B, -1)`;
    call="forward": `module(x, return_features=True)` (StyleGAN2-ADA's call);
    call="auto": "layers" when the module has a `layers` submodule, else "forward".
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", call: str = "auto"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception extractor not found at {path}: pass a local copy of the StyleGAN2-ADA / clean-fid "
                "TorchScript 'inception-2015-12-05.pt' (this command never downloads it)")
        if call not in ("auto", "layers", "forward"):
            raise ValueError(f"call={call!r} must be 'auto', 'layers' or 'forward'")
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"{path} is not a loadable TorchScript file: {str(e).strip().splitlines()[0]}") from e
        if call == "auto":
            call = "layers" if hasattr(self.module, "layers") else "forward"
        self.path, self.call, self.device = path, call, torch.device(device)
        self.sha256 = sha256_file(path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)  # (B, 3, 299, 299) in [0, 255]
        if self.call == "layers":
            return self.module.layers((x - 128) / 128).reshape(x.shape[0], -1)  # (B, 2048)
        return self.module(x, return_features=True).reshape(x.shape[0], -1)  # (B, 2048)

    def describe(self) -> dict:
        call = "module.layers((x - 128) / 128)" if self.call == "layers" else "module(x, return_features=True)"
        return {"extractor": str(self.path.resolve()), "extractor_sha256": self.sha256, "extractor_call": call}
