"""`make demo`: data, DeepSpeed training, sampling and a caption-consistency score, in minutes on a CPU.

1. generate the captioned-shapes data set (coloured shapes at positions on backgrounds, captions
   saying so), fit the image tokenizer (palette + binary masks; `--tokenizer patch_kmeans` for k-means),
   write WebDataset token shards;
2. train the `demo` preset through the DeepSpeed launcher (2 CPU ranks with gloo where there is no
   GPU, all GPUs otherwise), streaming the shards;
3. sample images for held-out captions (image ids only, top-k, classifier-free guidance), write a PNG
   grid (and its images as samples/{caption index:06d}.png), and judge whether each image shows the
   caption's colour, shape, position and background (t2i_ds.demo.judge): the real held-out images, the
   same after the tokenizer's encode -> decode, and the generated ones, next to chance (results.json);
4. write report.html (t2i_ds.eval.report), one self-contained page of all of it; its path is printed last.

Every image is a function of its caption, its index in val.jsonl, the seed and the model (t2i_ds.sampling):
`report` prints the `t2i_ds.generate` command that regenerates one of them alone, identical byte for byte.

    python -m t2i_ds.demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int, top_k
from t2i_ds.demo import data as demo_data

ROOT = Path(__file__).resolve().parents[2]  # the repository (ds_configs/)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n-train", type=positive_int, default=10_000)
    p.add_argument("--n-val", type=positive_int, default=200)
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--tokenizer", choices=sorted(demo_data.TOKENIZER_KINDS), default=demo_data.DemoSizes.tokenizer,
                   help="image tokenizer: palette + binary masks per patch (exact for the shapes), or patch k-means")
    p.add_argument("--masks", type=positive_int, default=demo_data.DemoSizes.masks,
                   help="mask codebook rows of the palette_mask tokenizer")
    p.add_argument("--codebook", type=positive_int, default=demo_data.DemoSizes.codebook_size,
                   help="image codes of the patch_kmeans tokenizer (more: a higher tokenizer ceiling, a harder model)")
    p.add_argument("--ranks", type=non_negative_int, default=0, help="processes (0: all GPUs, or 2 CPU ranks)")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--cfg-scale", type=non_negative_float, default=3.0)
    p.add_argument("--top-k", type=top_k, default=None)
    p.add_argument("--temperature", type=positive_float, default=0.5,
                   help="sampling temperature (benchmarks/results/demo_sizing.jsonl: the 1,000-step model scores shape "
                        "0.84 / 0.92 / 0.935 / 0.96 and position 0.925 / 0.955 / 0.955 / 0.96 at 1.0 / 0.7 / 0.5 / 0.3)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--grid", type=positive_int, default=32, help="images in the PNG grid")
    p.add_argument("--resume", action="store_true", help="continue an existing run instead of starting fresh")
    return p.parse_args(argv)


def sizes(args) -> demo_data.DemoSizes:
    return demo_data.DemoSizes(tokenizer=args.tokenizer, masks=args.masks, codebook_size=args.codebook)


def make_data(out: Path, args) -> Path:
    data = out / "data"
    if (data / demo_data.VOCAB_FILE).is_file() and (data / demo_data.VAL_CAPTIONS).is_file():
        held = (demo_data.image_tokenizer_spec(data).partition(":")[0], demo_data.load_demo_vocab(data).image_size)
        wanted = (demo_data.TOKENIZER_KINDS[args.tokenizer], sizes(args).image_codes)
        if held != wanted:
            raise ValueError(f"{data} holds a {held[1]}-code '{held[0]}' image tokenizer, not the {wanted[1]}-code "
                             f"'{wanted[0]}' one that --tokenizer/--masks/--codebook ask for: delete it or choose another --out")
        print(f"[demo] data: reusing {data}")
        return data
    t = time.perf_counter()
    demo_data.make_demo_dataset(data, args.n_train, args.n_val, args.seed, sizes(args))
    print(f"[demo] data: {args.n_train} training / {args.n_val} held-out pairs in {data} ({time.perf_counter() - t:.0f} s)")
    return data


def train_command(out: Path, data: Path, args) -> tuple[list[str], dict]:
    captions = [json.loads(line)["caption"] for line in (data / demo_data.VAL_CAPTIONS).read_text().splitlines()[:8]]
    sets = demo_data.train_overrides(data) + [
        f"train.sample_every={max(1, args.steps // 4)}", f"train.sample_captions={json.dumps(captions)}",
        f"train.run_dir={out / 'train'}", f"train.steps={args.steps}",
        f"train.seed={args.seed}", "train.resume=auto" if args.resume else "train.resume=never",
    ]
    cuda = torch.cuda.is_available()
    ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not cuda:  # CPU ranks: gloo, one thread each so two ranks share two cores without oversubscription
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 500),
           "--module", "t2i_ds.train", "--ds_config", args.ds_config, "--preset", "demo"]
    for s in sets:
        cmd += ["--set", s]
    return cmd, env


def train(out: Path, data: Path, args) -> None:
    cmd, env = train_command(out, data, args)
    if not args.resume and (out / "train").exists():
        import shutil

        shutil.rmtree(out / "train")  # a fresh run: stale checkpoints would be resumed otherwise
    print("[demo] train:", " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"[demo] training took {time.perf_counter() - t:.0f} s")


def sample_and_score(out: Path, data: Path, args) -> dict:
    """Generate an image per held-out caption, write the grid, judge real / round-tripped / generated images.

    Returns the results.json dict: the generated images' scores and chance (flat), the ceiling `table`
    (t2i_ds.demo.judge.ROWS), one `verdicts` entry per caption, and `seconds` of sampling and scoring.
    """
    from t2i_ds.data.images import to_uint8
    from t2i_ds.demo import judge
    from t2i_ds.eval.generation import image_name, write_png
    from t2i_ds.inference import load_run
    from t2i_ds.sampling import generate_images, save_grid

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run = load_run(out / "train")
    ids, attrs = demo_data.read_val_captions(data / demo_data.VAL_CAPTIONS)
    t = time.perf_counter()
    codes = generate_images(run.model, run.vocab, ids, cfg_scale=args.cfg_scale, top_k=args.top_k,
                            temperature=args.temperature, seed=args.seed)
    images = to_uint8(run.image_tokenizer.decode(codes))  # (N, H, W, 3) uint8
    sample_s = time.perf_counter() - t
    captions = [json.loads(line)["caption"] for line in (data / demo_data.VAL_CAPTIONS).read_text().splitlines()]
    save_grid(images[: args.grid], out / "samples.png", nrow=8, captions=captions[: args.grid])
    for i, image in enumerate(images[: args.grid]):  # the grid's images, named by caption index
        write_png(image, out / "samples" / image_name(i))
    t = time.perf_counter()
    real = np.stack([s.image for s in demo_data.held_out_samples(len(ids), args.seed, run.image_tokenizer.image_size)])  # val.jsonl's images
    table = judge.ceiling_table(real, run.image_tokenizer, images, attrs)
    sampling = {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
    return {**judge.consistency_score(images, attrs), "table": table, "verdicts": judge.verdicts(images, attrs),
            "sampling": sampling, "seconds": {"sample": sample_s, "score": time.perf_counter() - t}}


def regenerate_command(out: Path, args, index: int) -> list[str]:
    """The command that regenerates grid image `index` alone (the same PNG as samples/{index:06d}.png)."""
    cmd = ["python", "-m", "t2i_ds.generate", "--checkpoint", str(out / "train"), "--captions_file",
           str(out / "data" / demo_data.VAL_CAPTIONS), "--indices", str(index), "--out_dir", str(out / "alone"),
           "--cfg_scale", str(args.cfg_scale), "--temperature", str(args.temperature), "--seed", str(args.seed)]
    return cmd + (["--top_k", str(args.top_k)] if args.top_k else [])


def report_commands(out: Path, args) -> list[str]:
    """The commands a reader of the report needs: this demo again, and the report alone."""
    return [f"python -m t2i_ds.demo --out {out} --steps {args.steps} --n-train {args.n_train} --n-val {args.n_val} "
            f"--tokenizer {args.tokenizer} --masks {args.masks} --codebook {args.codebook} "
            f"--cfg-scale {args.cfg_scale} --temperature {args.temperature} --seed {args.seed}"
            + (f" --top-k {args.top_k}" if args.top_k else ""),
            " ".join(report_command(out))]


def report_command(out: Path) -> list[str]:
    """`python -m t2i_ds.eval report` of this demo's run (the page `make demo` writes)."""
    return ["python", "-m", "t2i_ds.eval", "report", "--run-dir", str(out / "train"), "--samples", str(out / "samples"),
            "--captions", str(out / "data" / demo_data.VAL_CAPTIONS), "--judge", str(out / "results.json"),
            "--out", str(out / "report.html")]


def report(out: Path, result: dict, args) -> Path:
    """Print the ceiling table and where everything is; write report.html (its path printed last)."""
    from t2i_ds.demo.judge import format_table
    from t2i_ds.eval.report import write_report

    print(f"\n[demo] caption consistency on {result['n']} held-out captions (fraction of images the judge finds right)")
    print("\n".join(format_table(result["table"])))
    print(f"  images: {out / 'samples.png'} (and one by one in {out / 'samples'})")
    print(f"  one image again, alone: {' '.join(regenerate_command(out, args, min(5, args.grid - 1)))}")
    print(f"  scores: {out / 'results.json'}")
    print(f"  logs:   tensorboard --logdir {out / 'train' / 'tb'}")
    return write_report(out / "train", out / "report.html", samples=out / "samples",
                        captions=out / "data" / demo_data.VAL_CAPTIONS, judge=out / "results.json",
                        commands=report_commands(out, args), title="t2i_ds demo: captioned shapes")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    start = t = time.perf_counter()
    data = make_data(out, args)
    seconds = {"data": time.perf_counter() - t}
    t = time.perf_counter()
    train(out, data, args)
    seconds["train"] = time.perf_counter() - t
    result = sample_and_score(out, data, args)
    result["seconds"] = {**seconds, **result["seconds"], "total": time.perf_counter() - start}  # the report's phases
    result["loadavg"] = os.getloadavg()  # 1, 5, 15 minutes: how quiet the machine was while the timings were taken
    (out / "results.json").write_text(json.dumps(result, indent=2))
    page = report(out, result, args)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())})")
    print(f"[demo] report: {page}")
    return 0


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.demo", main)
