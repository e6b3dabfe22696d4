"""`python -m t2i_ds.export`: a run's DeepSpeed checkpoint -> a transformers directory or an open_lm checkpoint.

    python -m t2i_ds.export --run-dir runs/t2i --out hf_model                 # transformers (the default for a directory)
    python -m t2i_ds.export --run-dir runs/t2i --out model.safetensors        # open_lm keys (.pt or .safetensors)
    python -m t2i_ds.export --run-dir runs/text_lm --out text_lm.pt --text-rows-only   # a "pre-trained LM"

The transformers directory (t2i_ds.model.hf) opens with `AutoModelForCausalLM.from_pretrained(dir)`, no custom code:
config.json (a StableLm, or Llama for RMSNorm models, with the image vocabulary and specials under "t2i_ds"),
model.safetensors, and the run's text tokenizer (`AutoTokenizer.from_pretrained(dir)`). `init.checkpoint=dir` reads
it back for `train`.

Any ZeRO stage and world size: DeepSpeed's `zero_to_fp32` consolidates the partitions; a stage-0 checkpoint's
module weights are read as they are (t2i_ds.inference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i_ds.cli import is_user_error, message_of
from t2i_ds.inference import checkpoint_dir, consolidated_state_dict, run_config
from t2i_ds.model.checkpoint import save_open_lm, text_rows_only
from t2i_ds.model.hf import save_hf
from t2i_ds.trainer.parallelize import model_args

OPEN_LM_SUFFIXES = (".pt", ".safetensors")


def output_format(out: str, fmt: str) -> str:
    """'hf' or 'open_lm': `fmt` when given, else by `out` (a .pt/.safetensors file: open_lm; anything else: hf)."""
    is_file = Path(out).suffix in OPEN_LM_SUFFIXES
    if fmt == "auto":
        return "open_lm" if is_file else "hf"
    if fmt == "open_lm" and not is_file:
        raise ValueError(f"--format open_lm writes a file: --out {out} must end in .pt or .safetensors")
    if fmt == "hf" and is_file:
        raise ValueError(f"--format hf writes a directory: --out {out} must not end in .pt or .safetensors")
    return fmt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="e.g. step_00001000 (default: newest complete)")
    p.add_argument("--out", required=True, help="a directory (transformers) or a .pt / .safetensors file (open_lm)")
    p.add_argument("--format", choices=("auto", "hf", "open_lm"), default="auto",
                   help="hf: transformers directory; open_lm: .pt ({'state_dict': ...}) or .safetensors; "
                        "auto (default): by --out's suffix")
    p.add_argument("--text-rows-only", action="store_true", help="drop image and special rows (a text LM)")
    a = p.parse_args(argv)
    try:
        a.format = output_format(a.out, a.format)  # auto resolved; a contradiction is a usage error
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = run_config(a.run_dir)
        ckpt = checkpoint_dir(a.run_dir, a.checkpoint)  # verified against its manifest
        sd = consolidated_state_dict(ckpt)
        vocab = cfg.vocab.build()
        if a.text_rows_only:
            sd = text_rows_only(sd, vocab)
        if a.format == "open_lm":
            save_open_lm(sd, a.out)
        else:
            args = model_args(cfg, vocab)
            if a.text_rows_only:  # a text LM: no image vocabulary to record
                args, vocab = args.replace(vocab_size=vocab.text_size), None
            save_hf(sd, args, a.out, vocab, text_tokenizer=text_tokenizer_path(cfg))
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"t2i_ds.export: error: {message_of(e)}", file=sys.stderr)
        return 2
    print(f"[t2i_ds] wrote {a.out} from {ckpt} ({sum(v.numel() for v in sd.values()):,} values)")
    return 0


def text_tokenizer_path(cfg) -> str:
    """The run's text tokenizer (its config's, else the NeoX BPE default)."""
    from t2i_ds.data.tokenizers import DEFAULT_TEXT_TOKENIZER

    return cfg.train.text_tokenizer or str(DEFAULT_TEXT_TOKENIZER)


if __name__ == "__main__":
    sys.exit(main())
