"""`python -m t2i_ds.eval`: evaluation commands.

    python -m t2i_ds.eval coco-captions --annotations captions_val2014.json --n 30000 --seed 0 --out coco30k.jsonl
    python -m t2i_ds.eval fid --run RUN_DIR --captions coco30k.jsonl --reference val2014/ \
        --inception inception-2015-12-05.pt --clip clip-vit-large-patch14/ --out runs/fid
    python -m t2i_ds.eval fid --images samples/ --captions coco30k.jsonl --reference val2014/ \
        --inception inception-2015-12-05.pt --out runs/fid

`coco-captions`: one caption per image id of a COCO captions file, reproducibly (t2i_ds.eval.generation).
`fid`: COCO FID (and CLIP score) of a run's samples, the GigaGAN / clean-fid protocol (t2i_ds.eval.fid describes
it): with --run it generates the images first (resumable); with --images it scores PNGs already written, e.g. by
`deepspeed --num_gpus 8 --module t2i_ds.generate --out_dir samples/ ...`.
`report`: one self-contained HTML page of a run (t2i_ds.eval.report): samples with their captions (and verdicts
where a judge file gives them), score table, loss and perplexity per modality, throughput, commands, config.

    python -m t2i_ds.eval report --run-dir RUN_DIR --samples samples/ --captions coco30k.jsonl --out report.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

import t2i_ds.demo  # noqa: F401  (registers the demo's image tokenizer kind, demo:DIR)
from t2i_ds.cli import non_negative_float, non_negative_int, positive_float, positive_int, top_k
from t2i_ds.eval import fid, generation, report


def load_run(run_dir, checkpoint: str | None, device: str):
    """inference.load_run, imported lazily (DeepSpeed is heavy); tests replace this function."""
    from t2i_ds.inference import load_run as _load_run

    return _load_run(run_dir, checkpoint, device=device)


def fid_main(args) -> int:
    """`python -m t2i_ds.eval fid ...`: check inputs, load, evaluate, print."""
    if args.run is None and args.images is None:
        raise ValueError("pass --run RUN_DIR (generate, then score) or --images DIR (score written images)")
    checks = [(args.captions, "captions file")] + ([(args.run, "run directory")] if args.run else [])
    if args.run is None:
        checks.append((args.images, "images folder"))
    for path, what in checks:
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
    if not Path(args.reference).exists():
        raise FileNotFoundError(f"reference {args.reference} does not exist (an image folder or an .npz)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = fid.TorchScriptExtractor(args.inception, device)  # before the model: a bad path fails in seconds
    clip = None
    if args.clip:
        from t2i_ds.eval.clip_score import ClipScorer

        clip = ClipScorer(args.clip, device)
    run = load_run(args.run, args.checkpoint, device) if args.run else None
    report = fid.evaluate_fid(run, args.captions, args.reference, extractor, args.out, images=args.images, clip=clip,
                              n=args.n, cfg_scale=args.cfg_scale, top_k=args.top_k or None,
                              temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                              resize=args.resize or None, workers=args.workers, run_dir=args.run,
                              checkpoint=args.checkpoint)
    print(json.dumps(report, indent=2))
    return 0


def report_main(args) -> int:
    page = report.write_report(args.run_dir, args.out or Path(args.run_dir) / "report.html", samples=args.samples,
                        captions=args.captions, judge=args.judge, n=args.n or None)
    print(f"wrote {page}")
    return 0


def coco_captions_main(args) -> int:
    rows, info = generation.coco_captions(args.annotations, args.n, args.seed)
    out = generation.write_captions(rows, info, args.out)
    print(f"wrote {len(rows)} captions (one per image id, seed {args.seed}) to {out}; selection in {generation.meta_path(out)}")
    return 0


def add_fid_arguments(p) -> None:
    """The `fid` subcommand's flags (an argparse parser)."""
    p.add_argument("--run", default=None, help="run directory of a trained model: generate the images first (resumes)")
    p.add_argument("--images", default=None, help="folder of {caption index:06d}.png to score (default with --run: OUT/images)")
    p.add_argument("--checkpoint", default=None, help="e.g. step_00095000 (default: the newest complete one)")
    p.add_argument("--captions", required=True, help=".txt (one caption a line) or .jsonl ('caption' key)")
    p.add_argument("--reference", required=True, help="reference image folder (e.g. COCO val2014) or an .npz of its stats")
    p.add_argument("--inception", required=True, help="local inception-2015-12-05.pt (TorchScript; never downloaded)")
    p.add_argument("--clip", default=None, help="local CLIP model directory (save_pretrained; never downloaded): CLIP score")
    p.add_argument("--out", required=True, help="directory: fid.jsonl, reference_stats/, images/")
    p.add_argument("--n", type=non_negative_int, default=30_000, help="first n captions (0: all)")
    p.add_argument("--cfg_scale", type=non_negative_float, default=3.0, help="classifier-free guidance (>= 0; 0: none)")
    p.add_argument("--top_k", type=top_k, default=1000, help="sample among the k likeliest codes (>= 1; none: all)")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--resize", type=non_negative_int, default=256, help="GigaGAN eval_res: LANCZOS to this size first (0: none)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers reading images")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_coco_arguments(p) -> None:
    p.add_argument("--annotations", required=True, help="COCO captions file, e.g. annotations/captions_val2014.json")
    p.add_argument("--n", type=non_negative_int, default=30_000, help="images (one caption each); 0: every image")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="coco30k.jsonl", help="the caption list (.jsonl; line i = caption index i)")


def add_report_arguments(p) -> None:
    p.add_argument("--run-dir", required=True, help="training run directory (config.json, metrics.jsonl, tb/)")
    p.add_argument("--samples", default=None, help="folder of {caption index:06d}.png to show (default: none)")
    p.add_argument("--captions", default=None, help=".txt (one caption a line) or .jsonl ('caption' key): image i's caption")
    p.add_argument("--judge", default=None, help="JSON with a score 'table' and per-image 'verdicts' (the demo's results.json)")
    p.add_argument("--n", type=non_negative_int, default=64, help="show the first n samples (0: all)")
    p.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_fid_arguments(sub.add_parser("fid", help="FID and CLIP score of a run's samples (clean-fid protocol)",
                                     description=fid.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_coco_arguments(sub.add_parser("coco-captions", help="one caption per COCO image id, reproducibly",
                                      description=generation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_report_arguments(sub.add_parser("report", help="one self-contained HTML page of a run",
                                        description=report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"coco-captions": coco_captions_main, "fid": fid_main, "report": report_main}
    return commands[args.command](args)


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.eval", main)
