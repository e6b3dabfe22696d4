"""`python -m t2i_ds.export`: a run's DeepSpeed checkpoint -> an open_lm checkpoint (.pt or .safetensors).

    python -m t2i_ds.export --run-dir runs/t2i --out model.safetensors
    python -m t2i_ds.export --run-dir runs/text_lm --out text_lm.pt --text-rows-only   # a "pre-trained LM"

Any ZeRO stage and world size: DeepSpeed's `zero_to_fp32` consolidates the partitions (t2i_ds.inference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i_ds.cli import is_user_error, message_of
from t2i_ds.inference import checkpoint_dir, consolidated_state_dict, run_config
from t2i_ds.model.checkpoint import save_open_lm, text_rows_only


def _out_file(text: str) -> str:
    if Path(text).suffix not in (".pt", ".safetensors"):
        raise argparse.ArgumentTypeError(f"{text} must end in .pt (open_lm's format) or .safetensors")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="e.g. step_00001000 (default: newest complete)")
    p.add_argument("--out", required=True, type=_out_file, help=".pt (open_lm {'state_dict': ...}) or .safetensors")
    p.add_argument("--text-rows-only", action="store_true", help="drop image and special rows (a text LM)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = run_config(a.run_dir)
        ckpt = checkpoint_dir(a.run_dir, a.checkpoint)  # verified against its manifest
        sd = consolidated_state_dict(ckpt)
        if a.text_rows_only:
            sd = text_rows_only(sd, cfg.vocab.build())
        save_open_lm(sd, a.out)
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"t2i_ds.export: error: {message_of(e)}", file=sys.stderr)
        return 2
    print(f"[t2i_ds] wrote {a.out} from {ckpt} ({sum(v.numel() for v in sd.values()):,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
