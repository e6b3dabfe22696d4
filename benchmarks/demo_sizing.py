"""Sizing experiment for `make demo`: which tokenizer, data, model and training reach the judge's ceiling?

Plain torch (no DeepSpeed) on CPU: builds the demo data set (`--tokenizer`, `--patch`, `--masks`, `--codebook`: the
image tokenizer),
scores the judge's ceiling rows once (t2i_ds.demo.judge: the real held-out images, and the same after the
tokenizer's encode -> decode), trains a model preset with AdamW
(linear warm-up, cosine decay to 10%) on `<doc> <text> caption </text> <image> codes </image> </doc>`
samples with 10% caption dropout (empty caption, the CFG-unconditional prompt), and at the
`--eval_at` steps samples held-out captions and prints the consistency scores
(t2i_ds.demo.judge) for each `--cfg` scale (with `--temperature`, `--top_k`), plus the background score split
by whether the caption states the background. Appends one JSON row per evaluation to
benchmarks/results/demo_sizing.jsonl, with the commit, the load average and the ceiling rows.

    .venv/bin/python benchmarks/demo_sizing.py --batch 16 --lr 2e-3 --steps 1000 --eval_at 250 500 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from t2i_ds.data.images import to_uint8
from t2i_ds.data.shards import list_shards, read_shard
from t2i_ds.demo import judge
from t2i_ds.data.image_tokenizers import load_image_tokenizer
from t2i_ds.demo.data import (TOKENIZER_KINDS, DemoSizes, held_out_samples, image_tokenizer_spec, load_demo_vocab,
                              make_demo_dataset, read_val_captions)
from t2i_ds.sampling import generate_images
from t2i_ds.model.args import model_preset
from t2i_ds.model.transformer import build_model, count_parameters

RESULTS = Path(__file__).parent / "results" / "demo_sizing.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/tmp/demo_sizing_data")
    p.add_argument("--n_train", type=int, default=10_000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--tokenizer", choices=sorted(TOKENIZER_KINDS), default=DemoSizes.tokenizer)
    p.add_argument("--masks", type=int, default=DemoSizes.masks, help="mask rows of the palette_mask tokenizer")
    p.add_argument("--codebook", type=int, default=DemoSizes.codebook_size, help="codes of the patch_kmeans tokenizer")
    p.add_argument("--patch", type=int, default=DemoSizes.patch)
    p.add_argument("--preset", default="demo")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=1000, help="schedule length (cosine to 10% at this step)")
    p.add_argument("--eval_at", type=int, nargs="+", default=[200, 400, 600, 800, 1000], help="steps to evaluate at")
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout probability")
    p.add_argument("--cfg", type=float, nargs="*", default=[0.0, 3.0])
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="each with each --cfg")
    p.add_argument("--note", default="", help="what this row tries (kept in the row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from_demo", default=None, help="append a row for a finished `python -m t2i_ds.demo --out DIR` run")
    p.add_argument("--resample", action="store_true",
                   help="with --from_demo: sample its model again at each --cfg x --temperature (--top_k), one row")
    p.add_argument("--ceiling_only", action="store_true", help="score the ceiling rows, append them, train nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 where other jobs share the cores)")
    return p.parse_args()


def load_split(data: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    samples = [s for path in list_shards(data / split) for s in read_shard(path)]
    return [s.caption_ids for s in samples], [s.codes.astype(np.int64) for s in samples]


def batches(vocab, ids, codes, batch: int, drop: float, rng: np.random.Generator):
    """Endless (input_ids, targets) (B, S) int64 batches, reshuffled every epoch."""
    while True:
        order = rng.permutation(len(ids))
        for start in range(0, len(ids) - batch + 1, batch):
            built = [vocab.text_to_image([] if rng.random() < drop else ids[i], codes[i]) for i in order[start : start + batch]]
            yield (torch.from_numpy(np.stack([b.input_ids for b in built])),
                   torch.from_numpy(np.stack([b.targets for b in built])))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def states_background(caption: str) -> bool:
    return "background" in caption


def evaluate(model, vocab, image_tok, val_ids, val_attrs, stated: list[bool], args) -> dict:
    out = {}
    for cfg, temperature in [(c, t) for c in args.cfg for t in args.temperature]:
        t = time.perf_counter()
        codes = generate_images(model, vocab, val_ids, cfg_scale=cfg, top_k=args.top_k, temperature=temperature,
                                seed=args.seed, batch_size=256)
        verdicts = judge.verdicts(to_uint8(image_tok.decode(codes)), val_attrs)
        row = {k: round(v, 3) for k, v in judge.summarise(verdicts).items()}
        for name, keep in (("background_stated", True), ("background_unstated", False)):
            picked = [v["background"] for v, s in zip(verdicts, stated) if s == keep]
            row[name] = round(float(np.mean(picked)), 3) if picked else None
        name = f"cfg{cfg:g}" + (f"_t{temperature:g}" if temperature != 1.0 else "")
        out[name] = {**row, "sample_s": round(time.perf_counter() - t, 1)}
    return out


def ceilings(image_tok, val_attrs, args) -> dict:
    """The judge's real and tokenizer rows on the held-out images (rounded)."""
    real = np.stack([s.image for s in held_out_samples(len(val_attrs), args.seed, image_tok.image_size)])
    rows = {"real": judge.verdicts(real, val_attrs), "tokenizer": judge.verdicts(judge.round_trip(image_tok, real), val_attrs)}
    return {name: {k: round(v, 3) for k, v in judge.summarise(v).items()} for name, v in rows.items()}


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout)
    return {"commit": commit + ("+dirty" if dirty else ""), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def record_head(args) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "torch": torch.__version__, **provenance(),
            "threads": torch.get_num_threads(), "args": vars(args)}


def append(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def demo_row(out: Path) -> dict:
    """The row of a finished demo run: its settings (resolved config), ceiling table, phase timings, load average."""
    result = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "train" / "config.json").read_text())
    settings = {"steps": cfg["train"]["steps"], "tokens_per_step": cfg["train"]["tokens_per_step"], "lr": cfg["optim"]["lr"],
                "codebook": cfg["vocab"]["image_size"], "model": cfg["model"], "caption_dropout": cfg["data"]["caption_dropout"]}
    return {"demo": str(out), "settings": settings, "sampling": result.get("sampling"), "table": result["table"], "seconds": result["seconds"],
            "loadavg_at_end": result.get("loadavg")}


def resample_demo(out: Path, args) -> dict:
    """The scores of a finished demo run's model at other sampling settings (no training)."""
    from t2i_ds.inference import load_run

    torch.set_num_threads(args.threads)
    run = load_run(out / "train")
    data = out / "data"
    val_ids, val_attrs = read_val_captions(data)
    stated = [states_background(json.loads(line)["caption"]) for line in (data / "val.jsonl").read_text().splitlines()]
    row = {"demo": str(out), "step": run.cfg.train.steps, **evaluate(run.model, run.vocab, run.image_tokenizer, val_ids, val_attrs, stated, args)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    args = parse_args()
    if args.from_demo and args.resample:
        append({**record_head(args), **resample_demo(Path(args.from_demo), args)})
        return
    if args.from_demo:
        append({**record_head(args), **demo_row(Path(args.from_demo))})
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    t0 = time.perf_counter()
    if not (data / "demo_vocab.json").exists():
        sizes = DemoSizes(tokenizer=args.tokenizer, masks=args.masks, codebook_size=args.codebook, patch=args.patch)
        make_demo_dataset(data, args.n_train, args.n_val, args.seed, sizes)
    data_s = time.perf_counter() - t0
    vocab = load_demo_vocab(data)
    image_tok = load_image_tokenizer(image_tokenizer_spec(data))
    ids, codes = load_split(data, "train")
    val_ids, val_attrs = read_val_captions(data)
    stated = [states_background(json.loads(line)["caption"]) for line in (data / "val.jsonl").read_text().splitlines()]
    ceiling = ceilings(image_tok, val_attrs, args)
    print("ceilings", json.dumps(ceiling), flush=True)
    if args.ceiling_only:
        append({**record_head(args), "data_s": round(data_s, 1), "ceiling": ceiling})
        return
    overrides = {k: v for k, v in (("dim", args.dim), ("n_layers", args.layers), ("n_heads", args.heads)) if v}
    margs = model_preset(args.preset, vocab_size=vocab.size, seq_len=vocab.seq_len, loss_impl="torch", **overrides)
    model = build_model(margs, vocab.modality_bounds)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    print(f"data {data_s:.1f}s, {len(ids)} train, vocab {vocab}, model {count_parameters(model):,} params {margs}")
    stream = batches(vocab, ids, codes, args.batch, args.drop, np.random.default_rng(args.seed))
    train_s, cpu_s, step = 0.0, 0.0, 0
    while step < max(args.eval_at):
        t, c = time.perf_counter(), time.process_time()
        x, y = next(stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        out = model(x, y)
        loss = out.loss_sum / out.count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        train_s += time.perf_counter() - t
        cpu_s += time.process_time() - c
        if step in args.eval_at:
            image_loss = (out.modality_sums[1] / out.modality_counts[1]).item()
            row = {"step": step, "wall_s": round(time.perf_counter() - t0, 1), "train_s": round(train_s, 1), "s_per_step": round(train_s / step, 3),
                   "cpu_s_per_step_per_thread": round(cpu_s / step / torch.get_num_threads(), 3),
                   "loss": round(loss.item(), 3), "image_loss": round(image_loss, 3),
                   **evaluate(model, vocab, image_tok, val_ids, val_attrs, stated, args)}
            print(json.dumps(row), flush=True)
            append({**record_head(args), "params": count_parameters(model), "ceiling": ceiling, **row})


if __name__ == "__main__":
    main()
