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

import torch

from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int
from t2i_ds.paper.alignment import AlignConfig, AlignVocab, run_alignment
from t2i_ds.vocab import Vocab


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
    cfg = AlignConfig(args.batch_size, args.steps, args.lr, args.weight_decay, args.seed, args.log_every)
    vocab = AlignVocab(args.text_size, args.real_text_size, args.image_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run_alignment(args.shards, args.checkpoint, Path(args.out), cfg, vocab, tokenizer=args.tokenizer,
                         max_pairs=args.max_pairs, n_report=args.report_codes, top_k=args.top_k, device=device)


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.paper.align", main)
