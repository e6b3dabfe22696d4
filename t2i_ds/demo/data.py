"""The embedded demo data set: captioned shapes -> token shards, tokenizers and vocabulary on disk.

`make_demo_dataset(out_dir, ...)` writes

    out_dir/train/        token shards (t2i_ds.data.shards format) + manifest.json
    out_dir/val/          token shards of the held-out images
    out_dir/val.jsonl     held-out captions, caption ids and ground-truth attributes (one JSON a line)
    out_dir/tokenizer.json        the word-level Hugging Face text tokenizer
    out_dir/image_tokenizer/      the image tokenizer: palette + masks (mask_tokenizer.PaletteMaskTokenizer, the
                                  default) or patch k-means (tokenizer.PatchKMeansTokenizer), `DemoSizes.tokenizer`
    out_dir/demo_vocab.json       the Vocab fields (text ids, codebook size, tokens per image, seq_len)

Sizes (`DemoSizes`, the one place they are written) were chosen so that a 4-layer, dim-128 model learns
the captions on two CPU cores in a few minutes (benchmarks/demo_sizing.py): 32 x 32 images,
4 x 4 patches -> 1 palette token + 64 mask tokens per image, 3 x 8 palette pairs + 128 masks = 152 codes, 64 text
rows of which the word-level tokenizer uses 36 (34 words + [PAD] + [UNK]), sequences of 65 + 6 + 14 = 85 tokens
(`demo_vocab` derives the last three).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from t2i_ds.atomic import atomic_write_text
from t2i_ds.demo import shapes
from t2i_ds.demo.mask_tokenizer import PaletteMaskTokenizer
from t2i_ds.demo.tokenizer import PatchKMeansTokenizer, to_tensor
from t2i_ds.data.shards import TokenShardWriter
from t2i_ds.vocab import Vocab

PAD, UNK = "[PAD]", "[UNK]"


# DemoSizes.tokenizer -> its registered image-tokenizer kind (t2i_ds/demo/__init__.py): specs are `kind:DIR`
TOKENIZER_KINDS = {"palette_mask": "demo_mask", "patch_kmeans": "demo"}


@dataclass(frozen=True)
class DemoSizes:
    """The demo's sizes; everything else (tokens per image, ids the tokenizer uses, seq_len) is derived."""

    image_px: int = shapes.IMAGE_SIZE
    """Pixels per image side."""
    patch: int = 4
    """Pixels per patch side of the image tokenizer (one token per patch)."""
    tokenizer: str = "palette_mask"
    """The image tokenizer: `palette_mask` (t2i_ds.demo.mask_tokenizer: a palette token + one binary-mask token per
    patch; exact for the demo's flat images, judge's shape score after encode -> decode 0.99 at 128 masks, the
    judge's own ceiling) or `patch_kmeans` (t2i_ds.demo.tokenizer, the former default: shape 0.535 at 256 codes)."""
    masks: int = 128
    """Mask codebook rows of `palette_mask` (shape after encode -> decode of the held-out images: 0.935 at 64 masks,
    0.99 at 128, 256 and 512; 53% of the images exact at 128, 93% at 256, 100% at 512)."""
    codebook_size: int = 256
    """Image codes (k-means centroids) of `patch_kmeans`. The judge's shape score of held-out images after encode -> decode
    (benchmarks/results/demo_sizing.jsonl, `ceiling`): 0.535 at 256 codes, 0.785 at 1,024, 0.91 at 2,048, 0.98 at
    4,096 (of the ~6,200 distinct 4 x 4 patches of 10,000 images): fewer codes average the edge patches that tell
    shapes apart.
    Yet the demo model does not learn 4,096 codes in 1,000 steps (generated colour 0.785, shape 0.325, against
    0.985 / 0.46 at 256); `palette_mask` keeps colour and shape apart instead."""
    text_size: int = 64
    """Text rows of the vocabulary (at least the word-level tokenizer's 36 ids)."""

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer={self.tokenizer!r}: choose one of {sorted(TOKENIZER_KINDS)}")

    @property
    def image_codes(self) -> int:
        """The Vocab's image ids: palette pairs + masks, or the k-means codes."""
        if self.tokenizer == "palette_mask":
            return len(shapes.BACKGROUNDS) * len(shapes.COLORS) + self.masks
        return self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return (self.image_px // self.patch) ** 2 + (self.tokenizer == "palette_mask")  # + the palette token

TEXT_TOKENIZER = "tokenizer.json"
IMAGE_TOKENIZER = "image_tokenizer"
VOCAB_FILE = "demo_vocab.json"
VAL_CAPTIONS = "val.jsonl"


def build_text_tokenizer() -> Tokenizer:
    """Word-level tokenizer over the shapes vocabulary: [PAD] = 0, [UNK] = 1, then the sorted words.

    Lower-cases, splits on whitespace and punctuation (`top-left:` -> `top - left :`).
    """
    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(shapes.words())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    return tok


def max_caption_tokens(tok: Tokenizer) -> int:
    """Longest caption any template can produce (every attribute value is one word; positions vary)."""
    lengths = []
    for row in shapes.ROWS:
        for col in shapes.COLS:
            pos = shapes.ShapeAttributes("red", "circle", row, col, "white").position
            for template in shapes.TEMPLATES:
                text = template.format(color="red", shape="circle", pos=pos, pos_h=pos.replace(" ", "-"), bg="white")
                lengths.append(len(tok.encode(text).ids))
    return max(lengths)


def demo_vocab(sizes: DemoSizes = DemoSizes(), tok: Tokenizer | None = None, pad_token: str = PAD) -> Vocab:
    """Vocab of the demo: `sizes.text_size` text rows (>= the tokenizer's ids), the codebook, one image's tokens,
    and room for the longest caption. `tok` (default: the word-level one) may be any tokenizer that has `pad_token`."""
    tok = tok or build_text_tokenizer()
    n_words = tok.get_vocab_size()
    if sizes.text_size < n_words:
        raise ValueError(f"text_size={sizes.text_size} is smaller than the {n_words} ids of the text tokenizer")
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"the text tokenizer has no pad token {pad_token!r}")
    seq_len = sizes.tokens_per_image + 6 + max_caption_tokens(tok)
    return Vocab(
        text_size=sizes.text_size,
        image_size=sizes.image_codes,
        image_tokens=sizes.tokens_per_image,
        seq_len=seq_len,
        pad_id=pad_id,
        real_text_size=n_words,
    )


def load_demo_vocab(path: str | os.PathLike) -> Vocab:
    """The Vocab from `demo_vocab.json` (or a directory holding it)."""
    p = Path(path)
    p = p / VOCAB_FILE if p.is_dir() else p
    return Vocab(**json.loads(p.read_text()))


def train_overrides(data_dir: str | os.PathLike) -> list[str]:
    """`--set` overrides pointing the `demo` run preset at a generated data set: its Vocab sizes, shards and
    tokenizers."""
    data = Path(data_dir)
    vocab = json.loads((data / VOCAB_FILE).read_text())
    return [f"vocab.{k}={v}" for k, v in vocab.items()] + [
        f"data.path={data / 'train'}", f"train.image_tokenizer={image_tokenizer_spec(data)}",
        f"train.text_tokenizer={data / TEXT_TOKENIZER}"]


def image_tokenizer_spec(data_dir: str | os.PathLike) -> str:
    """The `kind:DIR` spec of the image tokenizer a generated data set holds (its config.json names the kind)."""
    directory = Path(data_dir) / IMAGE_TOKENIZER
    kind = json.loads((directory / "config.json").read_text())["kind"]
    return f"{TOKENIZER_KINDS[kind]}:{directory}"


def fit_image_tokenizer(images: np.ndarray, sizes: DemoSizes, seed: int) -> PaletteMaskTokenizer | PatchKMeansTokenizer:
    """The image tokenizer `sizes` names, fitted on (N, S, S, 3) uint8 training images."""
    x = to_tensor(images)
    if sizes.tokenizer == "palette_mask":
        return PaletteMaskTokenizer.fit(x, len(shapes.BACKGROUNDS), len(shapes.COLORS), sizes.masks, sizes.patch)
    return PatchKMeansTokenizer.fit(x, sizes.codebook_size, sizes.patch, seed)


def encode_images(image_tok: PaletteMaskTokenizer | PatchKMeansTokenizer, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, T) int64 codes, in batches to bound memory."""
    parts = [image_tok.encode(to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy()


def _write_split(
    out_dir: Path, split: str, samples: Sequence[shapes.ShapeSample], codes: np.ndarray, ids: list[list[int]], meta: dict
) -> None:
    writer = TokenShardWriter(out_dir / split, prefix="tokens", samples_per_shard=1000, meta=meta)
    for i, (sample, c, caption_ids) in enumerate(zip(samples, codes, ids)):
        writer.write(f"{split}_{i:07d}", c, caption_ids, sample.caption, {"attributes": sample.attributes.to_dict()})
    writer.close()


def _write_val_captions(path: Path, samples: Sequence[shapes.ShapeSample], ids: list[list[int]]) -> None:
    lines = [
        json.dumps({"key": f"val_{i:07d}", "caption": s.caption, "caption_ids": c, "attributes": s.attributes.to_dict()})
        for i, (s, c) in enumerate(zip(samples, ids))
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_val_captions(path: str | os.PathLike) -> tuple[list[list[int]], list[shapes.ShapeAttributes]]:
    """Caption ids and ground-truth attributes of `val.jsonl` (or of a directory holding it)."""
    p = Path(path)
    p = p / VAL_CAPTIONS if p.is_dir() else p
    rows = [json.loads(line) for line in p.read_text().splitlines() if line]
    return [r["caption_ids"] for r in rows], [shapes.ShapeAttributes(**r["attributes"]) for r in rows]


def held_out_samples(n_val: int, seed: int, image_px: int = shapes.IMAGE_SIZE) -> list[shapes.ShapeSample]:
    """The held-out samples of `make_demo_dataset(..., n_val, seed)`: another stream than training's, so never seen."""
    return shapes.generate(n_val, seed + 1, image_px)


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    seed: int,
    sizes: DemoSizes = DemoSizes(),
    text_tok: Tokenizer | None = None,
    pad_token: str = PAD,
) -> dict:
    """Generate, tokenize and write the demo data set (layout in the module docstring); return a summary.

    `text_tok` captions the images (default: the word-level tokenizer; t2i_ds.paper.replicate passes a NeoX BPE)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = shapes.generate(n_train, seed, sizes.image_px)
    val = held_out_samples(n_val, seed, sizes.image_px)
    text_name = "demo_words" if text_tok is None else "custom"
    text_tok = text_tok or build_text_tokenizer()
    text_tok.save(str(out / TEXT_TOKENIZER))
    train_images = np.stack([s.image for s in train])  # (N, S, S, 3)
    image_tok = fit_image_tokenizer(train_images, sizes, seed)
    image_tok.save(out / IMAGE_TOKENIZER)
    vocab = demo_vocab(sizes, text_tok, pad_token)
    atomic_write_text(out / VOCAB_FILE, json.dumps(dataclasses.asdict(vocab), indent=2))
    meta = {
        "image_tokenizer": {"name": sizes.tokenizer, "path": str(out / IMAGE_TOKENIZER), "codebook_size": image_tok.codebook_size,
                            "grid": list(image_tok.grid), "image_size": sizes.image_px},
        "text_tokenizer": {"name": text_name, "path": str(out / TEXT_TOKENIZER), "vocab_size": text_tok.get_vocab_size()},
    }
    for split, samples in (("train", train), ("val", val)):
        ids = [e.ids for e in text_tok.encode_batch([s.caption for s in samples])]
        codes = encode_images(image_tok, np.stack([s.image for s in samples]))
        _write_split(out, split, samples, codes, ids, meta)
        if split == "val":
            _write_val_captions(out / VAL_CAPTIONS, samples, ids)
    return {"out_dir": str(out), "train": n_train, "val": n_val, "vocab": dataclasses.asdict(vocab), **meta}
