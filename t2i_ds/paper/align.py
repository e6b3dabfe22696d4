"""`python -m t2i_ds.paper.align`: image-text token contrastive alignment (paper section 3.2, Figure 7).

    python -m t2i_ds.paper.align --shards data/tokens --checkpoint open_lm_1b.pt --out runs/align \
        --tokenizer t2i_ds/assets/neox-20b-bpe.json

Reads token shards (t2i_ds.data.shards format) and the pre-trained text rows of an open_lm
checkpoint, trains the image rows with the CLIP loss (t2i_ds.paper.alignment), and writes into
--out: TensorBoard events (`align/loss`, `align/temperature`, `align/accuracy`),
`aligned_rows.safetensors` (the trainer's `aligned` init) and `nearest_tokens.md` (the nearest
text tokens of a sample of image codes, also printed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int
from t2i_ds.model.checkpoint import ROWS_FILE
from t2i_ds.paper.alignment import (
    AlignConfig,
    nearest_report,
    nearest_text_tokens,
    save_aligned_rows,
    train_alignment,
)
from t2i_ds.vocab import Vocab

REPORT_FILE = "nearest_tokens.md"


def read_pairs(spec: str, max_pairs: int | None = None) -> tuple[torch.Tensor, list[list[int]], int]:
    """(codes (N, n_img) int32, N captions, number of empty captions dropped) from token shards."""
    from t2i_ds.data.shards import list_shards, read_shard

    codes, captions, empty = [], [], 0
    for path in list_shards(spec):
        for s in read_shard(path):
            if len(s.caption_ids) == 0:
                empty += 1
                continue
            codes.append(np.asarray(s.codes, dtype=np.int32))
            captions.append(np.asarray(s.caption_ids).tolist())
            if max_pairs is not None and len(captions) >= max_pairs:
                return torch.from_numpy(np.stack(codes)), captions, empty
    if not captions:
        raise ValueError(f"no image-caption pairs with a non-empty caption in {spec!r}")
    return torch.from_numpy(np.stack(codes)), captions, empty


def read_text_rows(checkpoint: str, text_size: int) -> torch.Tensor:
    """The first `text_size` rows of the checkpoint's `tok_embeddings.weight` (the text block)."""
    from t2i_ds.model.checkpoint import read_state_dict

    rows = read_state_dict(checkpoint)["tok_embeddings.weight"]
    if len(rows) < text_size:
        raise ValueError(f"{checkpoint}: tok_embeddings has {len(rows)} rows, fewer than text_size={text_size}")
    return rows[:text_size].float()


def report_codes(codes: torch.Tensor, n: int, seed: int) -> list[int]:
    """A seeded sample of `n` distinct image codes among those present in the data, sorted."""
    present = torch.unique(codes.long())
    gen = torch.Generator().manual_seed(seed)
    return sorted(present[torch.randperm(len(present), generator=gen)[:n]].tolist())


def load_decoder(path: str | None):
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).decode


def parse_args(argv=None) -> argparse.Namespace:
    d, v = AlignConfig(), Vocab()
    p = argparse.ArgumentParser(prog="t2i_ds.paper.align", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="token shards: a directory, a glob, or a brace pattern")
    p.add_argument("--checkpoint", required=True, help="pre-trained open_lm checkpoint giving the text rows")
    p.add_argument("--out", required=True, help="output directory (TensorBoard events, rows, report)")
    p.add_argument("--tokenizer", help="text tokenizer JSON (tokenizers) to decode the nearest tokens")
    p.add_argument("--text_size", type=positive_int, default=v.text_size, help="text rows of the vocabulary")
    p.add_argument("--real_text_size", type=positive_int, default=v.real_text_size, help="ids the tokenizer can produce")
    p.add_argument("--image_size", type=positive_int, default=v.image_size, help="image codebook size")
    p.add_argument("--batch_size", type=positive_int, default=d.batch_size)
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--weight_decay", type=non_negative_float, default=d.weight_decay)
    p.add_argument("--seed", type=non_negative_int, default=d.seed)
    p.add_argument("--log_every", type=positive_int, default=d.log_every)
    p.add_argument("--max_pairs", type=positive_int, help="read at most this many pairs")
    p.add_argument("--report_codes", type=positive_int, default=32, help="image codes in the nearest-token report")
    p.add_argument("--top_k", type=positive_int, default=5, help="nearest text tokens listed per code")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    codes, captions, empty = read_pairs(args.shards, args.max_pairs)
    print(f"align: {len(captions):,} pairs ({empty:,} with an empty caption dropped), device {device}")
    text_rows = read_text_rows(args.checkpoint, args.text_size)
    cfg = AlignConfig(args.batch_size, args.steps, args.lr, args.weight_decay, args.seed, args.log_every)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:
        result = train_alignment(text_rows, codes, captions, args.image_size, cfg, writer, device)
    meta = {**vars(cfg), "checkpoint": args.checkpoint, "pairs": len(captions), "final_loss": result.losses[-1],
            "temperature": result.temperature, "text_size": args.text_size, "image_size": args.image_size}
    rows_path = save_aligned_rows(out / ROWS_FILE, result.image_rows, meta)

    sample = report_codes(codes, args.report_codes, args.seed)
    sims, ids = nearest_text_tokens(result.image_rows, text_rows, sample, args.top_k, args.real_text_size)
    report = f"final loss {result.losses[-1]:.4f}, temperature {result.temperature:.4f}\n\n"
    report += nearest_report(sims, ids, sample, load_decoder(args.tokenizer))
    (out / REPORT_FILE).write_text(report + "\n")
    print(report)
    print(f"align: wrote {rows_path} and {out / REPORT_FILE}")
    return rows_path


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.paper.align", main)
