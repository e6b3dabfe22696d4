"""The paper's main comparison at laptop scale: a "pre-trained" LM vs random init (Fig. 3, 4).

On the embedded captioned-shapes data:
  1. pre-train the demo model as a text-only LM on the captions (`data.mode=text`);
  2. export it with its text rows only: an open_lm checkpoint of a text LM (`t2i_ds.export`);
  3. train text-to-image twice from the same seed and data order: `init.mode=pretrained` from that
     checkpoint (image and special rows initialised randomly), and `init.mode=random`;
  4. draw Fig. 3 (perplexity) and Fig. 4 (text and image loss) from their TensorBoard event files.

    python -m t2i_ds.paper.compare_init --out runs/compare

Every step is the real trainer command (DeepSpeed engine), so the same sequence at scale is the recipe in docs/experiments.md with open_lm-1b in place of step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from t2i_ds.demo import data as demo_data
from t2i_ds.paper.runs import DS_CONFIG, ROOT, export_text_lm, train_demo_command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.paper.compare_init", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--data", default="", help="demo data directory (default: OUT/data, generated if missing)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--text-steps", type=int, default=300, help="steps of text-only pre-training")
    p.add_argument("--steps", type=int, default=300, help="steps of each text-to-image run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ds-config", default=str(DS_CONFIG))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ensure_data(args, out: Path) -> Path:
    data = Path(args.data) if args.data else out / "data"
    if not (data / demo_data.VOCAB_FILE).is_file():
        demo_data.make_demo_dataset(data, args.n_train, 16, args.seed)
    return data.resolve()


def run_train(run_dir: Path, data: Path, steps: int, extra: list[str], args) -> None:
    if run_dir.exists():  # a comparison trains fresh runs; the trainer refuses to start over one
        print(f"[compare] removing the earlier run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    print(f"[compare] {run_dir.name}: {steps} steps", flush=True)
    sets = [f"train.steps={steps}", f"train.log_every={args.log_every}", f"train.seed={args.seed}", *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(train_demo_command(run_dir, sets, data, Path(args.ds_config)), cwd=ROOT, env=env, check=True)


def final(run_dir: Path, key: str) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])[key]


def first(run_dir: Path, key: str) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])[key]


def main(argv=None) -> int:
    from t2i_ds.paper.curves import load_curves, make_figures

    args = parse_args(argv)
    out = Path(args.out).resolve()
    data = ensure_data(args, out)
    text_lm = out / "text_lm"
    run_train(text_lm, data, args.text_steps, ["data.mode=text", "data.caption_dropout=0.0"], args)
    ckpt = export_text_lm(text_lm, out / "text_lm.pt")  # a text LM
    runs = {"pretrained": out / "t2i_pretrained", "random": out / "t2i_random"}
    run_train(runs["pretrained"], data, args.steps, ["init.mode=pretrained", f"init.checkpoint={ckpt}"], args)
    run_train(runs["random"], data, args.steps, ["init.mode=random"], args)
    figs = make_figures({k: load_curves(v) for k, v in runs.items()}, out / "figures", names=("fig3", "fig4"), alpha=0.0)
    summary = {name: {k: (first(d, k), final(d, k)) for k in ("loss/text", "loss/image")} for name, d in runs.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[compare] loss at the first and the last logged step")
    for name, s in summary.items():
        print(f"  {name:10s} text {s['loss/text'][0]:.3f} -> {s['loss/text'][1]:.3f}   "
              f"image {s['loss/image'][0]:.3f} -> {s['loss/image'][1]:.3f}")
    print("  figures: " + ", ".join(str(p) for p in figs))
    return 0


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.paper.compare_init", main)
