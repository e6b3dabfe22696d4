"""open_lm checkpoint I/O and vocabulary extension.

open_lm saves `{"state_dict": ..., "epoch": ..., ...}` (or a bare state dict) with its own key
names; DDP adds `module.`, torch.compile adds `_orig_mod.`. Rotary models carry
`layers.{i}.attention.pos_embed.inv_freq` buffers, which a NoPE model does not have.
Loading is strict: any missing, unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from t2i_ds.atomic import atomic_open, atomic_path
from t2i_ds.model.args import ModelArgs
from t2i_ds.model.layers import RotaryEmbedding, trunc_normal_
from t2i_ds.vocab import SPECIAL_NAMES, Vocab

PREFIXES = ("module.", "_orig_mod.")
EMBED_KEYS = ("tok_embeddings.weight", "output.weight")


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model; the message lists every offending key."""


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an open_lm checkpoint (.pt with or without "state_dict", or .safetensors), prefixes stripped, or a
    transformers directory of this architecture (t2i_ds.model.hf: StableLm / Llama keys mapped to open_lm's)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from t2i_ds.model.hf import read_hf

        return read_hf(path)[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_prefixes(load_file(str(path)))
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    return strip_prefixes(obj)


def _reconcile_buffers(buffers: Mapping[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tolerate rotary `inv_freq` buffers: drop them for a model without, keep the model's if absent."""
    sd = {k: v for k, v in sd.items() if not (k.endswith(".inv_freq") and k not in buffers)}
    for k, v in buffers.items():
        if k.endswith(".inv_freq") and k not in sd:
            sd[k] = v
    return sd


def checked_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple] | None = None
) -> dict[str, torch.Tensor]:
    """`state_dict` with prefixes stripped and rotary buffers reconciled, after a strict check against the model:
    one error lists missing, unexpected and mis-shaped keys. `shapes` (name -> full shape) replaces the
    parameters' own shapes where they are held elsewhere (ZeRO-3 partitions)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in params}  # persistent buffers
    sd = _reconcile_buffers(buffers, strip_prefixes(state_dict))
    own = {n: tuple(t.shape) for n, t in {**buffers, **params}.items()}
    own.update(shapes or {})
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {own[k]}" for k in set(sd) & set(own) if tuple(sd[k].shape) != own[k]
    )
    if missing or unexpected or bad_shapes:
        lines = [f"checkpoint does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shapes)} mis-shaped)"]
        lines += [f"  missing: {k}" for k in missing[:50]]
        lines += [f"  unexpected: {k}" for k in unexpected[:50]]
        lines += [f"  shape: {s}" for s in bad_shapes[:50]]
        raise CheckpointMismatch("\n".join(lines))
    return sd


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load with one error listing missing, unexpected and mis-shaped keys."""
    model.load_state_dict(checked_state_dict(model, state_dict), strict=True)


def build_loaded(args: ModelArgs, modality_bounds: tuple[int, ...], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The Transformer holding `state_dict`'s tensors, built without any random init (for inference and export).

    The model is constructed on the meta device (no allocation, no random draws: neither open_lm's init nor the
    default init of nn.Linear / nn.Embedding), checked strictly as `load_into` does, and the tensors are assigned
    (`load_state_dict(assign=True)`), not copied: a memory-mapped .safetensors stays mapped, so loading costs one
    copy of the weights at most (a tensor of another dtype is converted to the model's). Training from scratch
    builds with `build_model` (which initialises); this is only for weights that exist.
    """
    from t2i_ds.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args, modality_bounds, init=False)
    own = model.state_dict(keep_vars=True)
    sd = checked_state_dict(model, state_dict)
    for k, v in sd.items():
        if v.is_meta:  # a buffer the checkpoint lacks (a rotary inv_freq): the model's own value, computed
            if not k.endswith(".inv_freq"):
                raise CheckpointMismatch(f"{k}: not in the checkpoint and not computable")
            v = RotaryEmbedding.frequencies(args.head_dim, args.rotary_theta)
        sd[k] = v.to(own[k].dtype) if v.is_floating_point() else v
    model.load_state_dict(sd, strict=True, assign=True)
    if args.weight_tying:  # assign replaced both tensors: tie them again, as the constructor did
        model.tok_embeddings.weight = model.output.weight
    return model


def new_rows(old: torch.Tensor, n_new: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows for the extended vocabulary, (n_new, dim), in the dtype of `old`.

    random: open_lm's embedding init, trunc_normal(std = 1/sqrt(dim), +-3 std).
    mean:   every new row is the mean of the pre-trained rows.
    """
    dim = old.shape[1]
    if init == "random":
        rows = torch.empty(n_new, dim, dtype=torch.float32)
        std = 1.0 / math.sqrt(dim)
        if generator is None:
            trunc_normal_(rows, std)
        else:  # trunc_normal_ takes a generator from torch 2.x on; keep seeds reproducible
            nn.init.trunc_normal_(rows, 0.0, std, -3 * std, 3 * std, generator=generator)
    elif init == "mean":
        rows = old.float().mean(0, keepdim=True).expand(n_new, dim).clone()
    else:
        raise ValueError(f"unknown row init {init!r}; choose 'random' or 'mean'")
    return rows.to(old.dtype)


def extend_vocab(
    state_dict: Mapping[str, torch.Tensor],
    new_size: int,
    init: str = "random",
    seed: int = 0,
    rows: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Grow `tok_embeddings` and `output` from V0 to `new_size` rows; rows [0, V0) are copied exactly.

    `rows` optionally gives the new rows per key (e.g. from contrastive alignment), shape
    (new_size - V0, dim); keys it does not name are initialised by `init`.
    """
    sd = dict(strip_prefixes(state_dict))
    gen = torch.Generator().manual_seed(seed)
    for key in EMBED_KEYS:
        if key not in sd:
            continue  # tied models store only one of them
        old = sd[key]
        if old.shape[0] > new_size:
            raise CheckpointMismatch(f"{key} has {old.shape[0]} rows, more than the new vocabulary {new_size}")
        extra = new_size - old.shape[0]
        given = None if rows is None else rows.get(key)
        if given is not None and tuple(given.shape) != (extra, old.shape[1]):
            raise CheckpointMismatch(f"rows for {key} have shape {tuple(given.shape)}, expected {(extra, old.shape[1])}")
        add = given.to(old.dtype) if given is not None else new_rows(old, extra, init, gen)
        sd[key] = torch.cat([old, add], dim=0)
    return sd


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves a half file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_open_lm(model_or_sd: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save in open_lm's format (`{"state_dict": ...}`, .pt) or as .safetensors, atomically."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        if "output.weight" in sd and "tok_embeddings.weight" in sd and sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr():
            sd["tok_embeddings.weight"] = sd["tok_embeddings.weight"].clone()  # safetensors refuses shared storage
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp))
    else:
        atomic_save({"state_dict": sd}, path)


def text_rows_only(sd: Mapping[str, torch.Tensor], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Keep the text rows of the embedding and output: the checkpoint of a text LM of the same shape."""
    return {k: (v[: vocab.text_size].clone() if k in EMBED_KEYS else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# Rows from the contrastive alignment (t2i_ds.paper.align writes them; init.new_rows=aligned reads them)
# ----------------------------------------------------------------------------------------------------------------

ROWS_KEY = "image_rows"
ROWS_FILE = "aligned_rows.safetensors"


def load_aligned_rows(path: str | Path, vocab: Vocab, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """New rows for `extend_vocab(..., rows=...)` from an alignment file, for both embedding keys.

    Each value is (image_size + 6, dim) fp32: the aligned image rows, then the 6 special rows
    drawn with open_lm's init (trunc normal, std 1/sqrt(dim)) from `seed`. The pre-trained
    checkpoint must have exactly `vocab.text_size` rows, so that the new rows start at the image block.
    """
    from safetensors.torch import load_file

    image_rows = load_file(str(path))[ROWS_KEY].float()
    if tuple(image_rows.shape) != (vocab.image_size, dim):
        raise ValueError(f"{path}: image_rows has shape {tuple(image_rows.shape)}, expected {(vocab.image_size, dim)}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in EMBED_KEYS:
        specials = new_rows(image_rows, len(SPECIAL_NAMES), "random", gen)  # (6, dim), drawn per key
        out[key] = torch.cat([image_rows, specials], dim=0)
    return out
