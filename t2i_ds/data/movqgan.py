"""MoVQGAN image tokenizer through diffusers' `VQModel(norm_type="spatial")`, and the SBER checkpoint converter.

Encoding: x (B, 3, H, W) in [-1, 1] -> encoder -> quant_conv -> h (B, D, H/f, W/f) -> the model's own
quantizer -> indices, flattened (b, row, col) = raster order. `VQModel.encode(x).latents` is h, i.e.
pre-quantisation. Decoding: codebook rows (B, D, H/f, W/f) -> `VQModel.decode(z_q, force_not_quantize=True)`;
MoVQ's spatial-norm decoder uses z_q itself as conditioning, so decode gets the codebook vectors, never
re-quantised latents. Always fp32: near-tied codebook distances flip in bf16/fp16.
The converter's command is t2i_ds.convert_movqgan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

# SBER MoVQGAN sizes as diffusers VQModel configs (Kandinsky 2.2's `movq` is the 67M shape, Kandinsky 3's the 270M).
_MOVQ_BASE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=16_384,
    norm_num_groups=32,
    norm_type="spatial",
    sample_size=256,
)
MOVQGAN_CONFIGS = {
    "67M": {**_MOVQ_BASE, "block_out_channels": (128, 256, 256, 512), "layers_per_block": 2},
    "102M": {**_MOVQ_BASE, "block_out_channels": (128, 256, 256, 512), "layers_per_block": 4},
    "270M": {**_MOVQ_BASE, "block_out_channels": (256, 512, 512, 1024), "layers_per_block": 2},
    # Tests and CPU demos: the same architecture (spatial norm, attention at the lowest resolution), 4x down,
    # 64 codes. Channels stay multiples of 32 because diffusers' SpatialNorm uses 32 groups.
    "tiny": {
        **_MOVQ_BASE,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (32, 32, 32),
        "layers_per_block": 1,
        "num_vq_embeddings": 64,
        "sample_size": 16,
    },
}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MoVQGANTokenizer:
    """ImageTokenizer over a diffusers `VQModel` (fp32, batched, eval mode)."""

    name = "movqgan"

    def __init__(self, model, image_size: int = 256, batch_size: int = 64, device: torch.device | str | None = None):
        cfg = model.config
        self.device = torch.device(device) if device is not None else _default_device()
        if model.dtype != torch.float32:
            model = model.float()
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.batch_size = batch_size
        factor = 2 ** (len(cfg.block_out_channels) - 1)  # one 2x downsample per encoder block but the last
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not a multiple of the downsampling factor {factor}")
        self.grid = (image_size // factor, image_size // factor)
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.embed_dim = int(cfg.vq_embed_dim or cfg.latent_channels)
        self.path = ""

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "MoVQGANTokenizer":
        """From a local `save_pretrained` directory (config.json + weights); never downloads."""
        from diffusers import VQModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no VQModel at {path} (expected config.json and weights from save_pretrained)")
        model = VQModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
        if model.config.norm_type != "spatial":
            raise ValueError(f"{path}: norm_type={model.config.norm_type!r}, MoVQGAN needs 'spatial'")
        tok = cls(model, **kwargs)
        tok.path = str(path)
        return tok

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, grid_h * grid_w) int64 codes, raster order."""
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        out = [self._encode_chunk(chunk) for chunk in images.split(self.batch_size)]
        return torch.cat(out).cpu()

    def _encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        h = self.model.encode(x).latents  # (b, D, gh, gw), pre-quantisation
        _, _, (_, _, idx) = self.model.quantize(h)  # idx: (b * gh * gw,) or (b*gh*gw, 1)
        return idx.reshape(x.shape[0], -1).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid_h * grid_w) int64 codes -> (B, 3, H, W) float in [-1, 1]."""
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected codes (B, {self.tokens_per_image}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        out = [self._decode_chunk(chunk) for chunk in codes.split(self.batch_size)]
        return torch.cat(out).cpu()

    def _decode_chunk(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        shape = (b, *self.grid, self.embed_dim)  # (b, gh, gw, D): get_codebook_entry permutes to (b, D, gh, gw)
        z_q = self.model.quantize.get_codebook_entry(codes.to(self.device).reshape(-1), shape)
        return self.model.decode(z_q, force_not_quantize=True).sample.clamp(-1, 1)

    def describe(self) -> dict:
        """What the shard manifest records about the image tokenizer."""
        return {
            "name": self.name,
            "path": self.path,
            "codebook_size": self.codebook_size,
            "grid": list(self.grid),
            "image_size": self.image_size,
        }


# ---- SBER .ckpt -> diffusers -----------------------------------------------------------------------
# Renaming rules, applied in order to each SBER key (after `decoder.up.{k}` is re-indexed, since SBER
# stores decoder levels from the lowest resolution up and diffusers from the highest down).
_RULES = [
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up_blocks\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up_blocks\.(\d+)\.attn\.", r"decoder.up_blocks.\1.attentions."),
    (r"^decoder\.up_blocks\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # 1x1 convs -> linear layers
_DROP_PREFIXES = ("loss.",)  # discriminator / perceptual-loss weights in training checkpoints


def _rename(key: str, n_up: int) -> str:
    m = re.match(r"^decoder\.up\.(\d+)\.", key)
    if m:  # SBER decoder.up.k == diffusers decoder.up_blocks.(n_up - 1 - k)
        key = f"decoder.up_blocks.{n_up - 1 - int(m[1])}." + key[m.end() :]
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    if ".attentions." in key:
        key = re.sub(r"\.attentions\.(\d+)\.(q|k|v|proj_out)\.", lambda m: f".attentions.{m[1]}.{_ATTN[m[2]]}.", key)
        # encoder attention norms are GroupNorms, decoder ones MoVQ spatial norms
        key = re.sub(r"\.attentions\.(\d+)\.norm\.(weight|bias)$", r".attentions.\1.group_norm.\2", key)
        key = re.sub(r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.spatial_norm.", key)
    return key


def _unwrap(ckpt: Mapping) -> dict:
    state = ckpt.get("state_dict", ckpt)
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(_DROP_PREFIXES)}


def convert_sber_movqgan(ckpt_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SBER MoVQGAN state dict (or a Lightning ckpt holding one) -> diffusers `VQModel` state dict."""
    state = _unwrap(ckpt_state_dict)
    n_up = 1 + max((int(m[1]) for k in state if (m := re.match(r"^decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in state.items():
        new = _rename(key, n_up)
        if re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and value.ndim == 4:
            value = value[:, :, 0, 0]  # (out, in, 1, 1) conv -> (out, in) linear
        if new in out:
            raise ValueError(f"two SBER keys map onto {new!r} (second: {key!r})")
        out[new] = value
    return out


def load_sber_movqgan(ckpt_path: str | Path, size: str):
    """Build the `size` VQModel and load a converted SBER checkpoint strictly (missing keys are errors)."""
    from diffusers import VQModel

    if size not in MOVQGAN_CONFIGS:
        raise ValueError(f"unknown MoVQGAN size {size!r}; known: {sorted(MOVQGAN_CONFIGS)}")
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    model = VQModel(**MOVQGAN_CONFIGS[size])
    result = model.load_state_dict(convert_sber_movqgan(ckpt), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ckpt_path} does not match MoVQGAN-{size}: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    return model
