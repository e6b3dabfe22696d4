"""Decode token shards back to images (with their captions) to check what training will see.

    python -m t2i_ds.inspect_shards --shards DIR --image-tokenizer movqgan:DIR --out previews/ --n 16
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from t2i_ds.data.image_tokenizers import load_image_tokenizer
from t2i_ds.data.images import to_pil
from t2i_ds.data.shards import list_shards, read_manifest, read_shard


def decode_shards(shards: str, image_tokenizer: str, out: str | Path, n: int = 16) -> list[Path]:
    """Decode the first `n` samples to `out/{key}.png` + `out/{key}.txt`; returns the image paths."""
    try:
        expected = read_manifest(Path(list_shards(shards)[0]).parent)["image_tokenizer"]
    except FileNotFoundError:
        expected = {}  # no manifest: trust the caller
    size = {"image_size": expected["image_size"]} if image_tokenizer.startswith("movqgan:") and expected else {}
    tok = load_image_tokenizer(image_tokenizer, **size)
    if expected and (expected["codebook_size"] != tok.codebook_size or list(expected["grid"]) != list(tok.grid)):
        raise ValueError(f"shards were made with {expected}, not with {image_tokenizer}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in list_shards(shards):
        samples = read_shard(shard)[: n - len(written)]
        if not samples:
            continue
        codes = torch.stack([torch.from_numpy(s.codes.astype("int64")) for s in samples])  # (B, T)
        for s, img in zip(samples, tok.decode(codes)):
            to_pil(img).save(out / f"{s.key}.png")
            (out / f"{s.key}.txt").write_text(s.caption + "\n" + json.dumps(s.meta) + "\n")
            written.append(out / f"{s.key}.png")
        if len(written) >= n:
            break
    return written
