"""Image generation throughput: the fast decode loop vs the previous one (the baseline), side by side in one run.

For each model and batch size, `t2i_ds.sampling.generate_images` runs end to end (prefill + every image token,
classifier-free guidance on, so 2b rows a forward) with loop="fast" and loop="baseline", alternating,
`--repeats` times each; images/s = batch / the fastest repetition (the least disturbed by other processes on a
shared machine; every repetition is recorded). Models, with random weights (speed does not depend on them):

    demo           the `make demo` model (dim 128, 4 layers) on the demo vocabulary (256 codes, 64 tokens an image)
    open_lm_1b_2l  open_lm-1b (dim 2048, 16 heads, SwiGLU 5632, head_rotary) cut to 2 layers, on the paper's
                   vocabulary (66,822 rows, 16,384 codes, 1,024 tokens an image)
    open_lm_1b     the whole open_lm-1b (24 layers) on that vocabulary: the GPU measurement

Loops: "fast", "baseline", and "fast+compile" (the fast loop with `compile=True`: its static-shape step under
torch.compile(mode="reduce-overhead"), i.e. CUDA graphs on a GPU).

A second part times the sampling alone on the paper's (2b, 66,822) logits: the baseline's torch path (image slice,
CFG mix, top-k, softmax, multinomial) vs the op `t2i::cfg_sample` vs its pure-torch reference.

    python benchmarks/bench_generate.py --threads 1                     # the README table (CPU: ~1 h)
    python benchmarks/bench_generate.py --models demo --repeats 3
    python benchmarks/bench_generate.py --smoke --out /tmp/gen.jsonl   # a tiny model, seconds: checks the script

One JSON line per (model, batch, loop) and per sampling case, with device, versions, commit and date, appended to
benchmarks/results/generate.jsonl; a markdown table with the fast/baseline ratio is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("demo", "open_lm_1b_2l", "open_lm_1b")
LOOPS = ("fast", "baseline", "fast+compile")


def environment() -> dict:
    from t2i_ds.provenance import git_revision

    cuda = torch.cuda.is_available()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_revision(),
        "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "threads": torch.get_num_threads(),
    }


def build(name: str, device: str, image_tokens: int | None, dtype: torch.dtype = torch.float32):
    """(model, vocab, top_k) of a named benchmark model, random weights, eval mode."""
    from t2i_ds.model.args import model_preset
    from t2i_ds.model.transformer import build_model
    from t2i_ds.vocab import Vocab, tiny_vocab

    torch.manual_seed(0)
    if name == "demo":
        from t2i_ds.demo.preset import demo

        vocab, top_k = demo().vocab.build(), None  # the demo samples without top-k
        args = model_preset("demo", vocab_size=vocab.size, seq_len=vocab.seq_len)
    elif name in ("open_lm_1b_2l", "open_lm_1b"):
        vocab, top_k = Vocab(), 1000  # the COCO FID protocol's top-k
        args = model_preset("open_lm_1b", vocab_size=vocab.size, n_layers=2 if name == "open_lm_1b_2l" else 24)
    elif name == "smoke":
        vocab, top_k = tiny_vocab(), 20
        args = model_preset("debug", vocab_size=vocab.size, seq_len=vocab.seq_len)
    else:
        raise ValueError(f"unknown model {name!r}")
    if image_tokens and image_tokens < vocab.image_tokens:  # the first `image_tokens` codes of every image
        vocab = replace(vocab, image_tokens=image_tokens)
    args = args.replace(loss_impl="torch", attn_backend="sdpa" if device == "cpu" else "auto")
    return build_model(args, vocab.modality_bounds, device=device).to(dtype).eval(), vocab, top_k


def captions(vocab, n: int) -> list[list[int]]:
    """n captions of 6..15 tokens (different lengths: left padding, as in real batches)."""
    g = torch.Generator().manual_seed(1)
    top = min(vocab.real_text_size, vocab.text_size)
    return [torch.randint(0, top, (6 + i % 10,), generator=g).tolist() for i in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_generation(args, env: dict) -> list[dict]:
    from t2i_ds.sampling import generate_images

    rows = []
    for name in args.models:
        model, vocab, top_k = build(name, args.device, args.image_tokens, getattr(torch, args.dtype))
        for batch in args.batches:
            caps = captions(vocab, batch)
            kw = dict(cfg_scale=args.cfg_scale, top_k=top_k, temperature=1.0, seed=0, batch_size=batch)
            generate_images(model, vocab, caps[:2], **{**kw, "batch_size": 2})  # warm-up: builds/loads the op
            if "fast+compile" in args.loops:  # compilation and graph capture happen here, outside the timing
                generate_images(model, vocab, caps, **kw, **loop_kwargs("fast+compile"))
            times = {loop: [] for loop in args.loops}
            for _ in range(args.repeats):  # alternate, so both loops see the same background load
                for loop in args.loops:
                    sync(args.device)
                    t = time.perf_counter()
                    generate_images(model, vocab, caps, **kw, **loop_kwargs(loop))
                    sync(args.device)
                    times[loop].append(time.perf_counter() - t)
                    print(f"[generate] {name} batch {batch} {loop}: {times[loop][-1]:.1f} s", flush=True)
            for loop in args.loops:
                best = min(times[loop])
                rows.append({
                    "bench": "generate", **env, "model": name, "dtype": args.dtype, "batch": batch, "loop": loop,
                    "cfg_scale": args.cfg_scale,
                    "top_k": top_k, "image_tokens": vocab.image_tokens, "vocab_size": vocab.size,
                    "seconds": [round(x, 3) for x in times[loop]], "best_seconds": round(best, 3),
                    "images_per_s": batch / best, "ms_per_token_step": 1e3 * best / vocab.image_tokens,
                })
        del model
    return rows


def loop_kwargs(loop: str) -> dict:
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; choose from {LOOPS}")
    return {"loop": "fast", "compile": True} if loop == "fast+compile" else {"loop": loop}


def time_min(fn, repeats: int, device: str) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_sampling(args, env: dict) -> list[dict]:
    """One sampling step on (2b, V) logits: the baseline's torch path vs the op vs the reference."""
    from t2i_ds.sampling import sample_from_logits
    from t2i_ds.vocab import Vocab
    from t2i_kernels.cfg_sample import cfg_sample

    vocab, cfg, top_k = Vocab(), args.cfg_scale, 1000
    a, z = vocab.image_offset, vocab.special_offset
    rows = []
    for b in args.sampling_batches:
        logits = torch.randn(2 * b, vocab.size, generator=torch.Generator().manual_seed(b)).to(args.device) * 3
        keys = torch.stack([torch.zeros(b, dtype=torch.long), torch.arange(b)], 1).to(args.device)
        step = torch.zeros((), dtype=torch.long, device=args.device)
        gen = torch.Generator(device=args.device).manual_seed(0)

        def torch_path():
            image = logits[:, a:z]
            mixed = image[b:] + cfg * (image[:b] - image[b:])
            return sample_from_logits(mixed, top_k, 1.0, gen)

        cases = {"torch (baseline)": torch_path,
                 "op": lambda: cfg_sample(logits, keys, step, a, z, cfg, 1.0, top_k, impl="op"),
                 "reference": lambda: cfg_sample(logits, keys, step, a, z, cfg, 1.0, top_k, impl="ref")}
        for impl, fn in cases.items():
            ms = 1e3 * time_min(fn, args.sampling_repeats if impl != "reference" else 2, args.device)
            rows.append({"bench": "generate_sampling", **env, "impl": impl, "batch": b, "rows": 2 * b, "vocab_size": vocab.size,
                         "image_size": vocab.image_size, "cfg_scale": cfg, "top_k": top_k, "ms": ms})
            print(f"[sampling] batch {b} {impl}: {ms:.1f} ms", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    gen = {(r["model"], r["batch"], r["loop"]): r for r in rows if r["bench"] == "generate"}
    loops = [loop for loop in LOOPS if any(k[2] == loop for k in gen)]
    ips = lambda key: gen[key]["images_per_s"] if key in gen else None  # noqa: E731
    head = "| model | image tokens | batch (CFG rows) | " + " | ".join(f"{loop} images/s" for loop in loops)
    ratios = [loop for loop in loops if loop != "baseline"] if "baseline" in loops else []
    out = [head + "".join(f" | {loop} / baseline" for loop in ratios) + " |",
           "|---" * (3 + len(loops) + len(ratios)) + "|"]
    for model, batch in dict.fromkeys((k[0], k[1]) for k in gen):
        any_row = next(r for k, r in gen.items() if k[:2] == (model, batch))
        cells = [f"{ips((model, batch, loop)):.3g}" if ips((model, batch, loop)) else "-" for loop in loops]
        base = ips((model, batch, "baseline"))
        cells += [f"{ips((model, batch, loop)) / base:.2f}x" if base and ips((model, batch, loop)) else "-" for loop in ratios]
        out.append(f"| {model} | {any_row['image_tokens']} | {batch} ({2 * batch}) | " + " | ".join(cells) + " |")
    samp = [r for r in rows if r["bench"] == "generate_sampling"]
    if samp:
        out += ["", "| sampling step, (2b, 66,822) logits, top-k 1000 | batch | ms |", "|---|---|---|"]
        out += [f"| {r['impl']} | {r['batch']} | {r['ms']:.1f} |" for r in samp]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    p.add_argument("--loops", type=lambda s: s.split(","), default=["fast", "baseline"], help=f"comma list of {LOOPS}")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", help="model weights")
    p.add_argument("--repeats", type=int, default=1, help="repetitions of each generation (the fastest counts)")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--image-tokens", type=int, default=0,
                   help="decode only the first N codes of each image where the vocabulary has more (0: all); the "
                        "baseline's per-step torch.cat grows with position, so a cut decode understates its cost")
    p.add_argument("--sampling-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 64])
    p.add_argument("--sampling-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default); on a shared CPU "
                   "one thread is the measurement least disturbed by other processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="a debug model on a tiny vocabulary: checks the script")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.jsonl"))
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeats, args.sampling_batches, args.sampling_repeats = ["smoke"], [2, 3], 1, [2], 2
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    rows = bench_generation(args, env) + bench_sampling(args, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
