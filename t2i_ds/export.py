"""Turn a run's DeepSpeed checkpoint into an open_lm checkpoint, or a model ready for inference.

ZeRO-2/3 checkpoints hold the fp32 master weights in optimizer partitions; DeepSpeed's own
`zero_to_fp32` consolidates them (any world size) into one state dict with open_lm's key names.

    python -m t2i_ds.export --run-dir runs/t2i --out model.safetensors
    python -m t2i_ds.export --run-dir runs/text_lm --out text_lm.pt --text-rows-only   # a "pre-trained LM"
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_ds.config import Config, ConfigError, from_dict
from t2i_ds.model import Transformer
from t2i_ds.model.checkpoint import EMBED_KEYS, load_into, save_open_lm
from t2i_ds.trainer.checkpointing import complete_checkpoints
from t2i_ds.trainer.parallelize import model_args
from t2i_ds.vocab import Vocab


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a t2i_ds run directory")
    return from_dict(json.loads(path.read_text()))


def checkpoint_dir(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The named checkpoint, or the newest complete one."""
    root = Path(run_dir) / "checkpoints"
    if checkpoint:
        path = root / checkpoint if not Path(checkpoint).is_dir() else Path(checkpoint)
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint")
        return path
    found = complete_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    return found[-1]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a (possibly ZeRO-partitioned) DeepSpeed checkpoint directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def load_model_for_inference(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu") -> tuple[Transformer, Vocab, Config]:
    """The trained model (eval mode) with its Vocab and Config."""
    cfg = run_config(run_dir)
    vocab = cfg.vocab.build()
    args = model_args(cfg, vocab).replace(loss_impl="torch" if device == "cpu" else "auto")
    model = Transformer(args, vocab.modality_bounds)
    load_into(model, consolidated_state_dict(checkpoint_dir(run_dir, checkpoint)))
    return model.to(device).eval(), vocab, cfg


@dataclass
class InferenceRun:
    """A trained run ready for sampling: model (eval), its Vocab and Config, and its tokenizers."""

    model: Transformer
    vocab: Vocab
    cfg: Config
    text_tokenizer: object  # t2i_ds.data.text_tokenizer.TextTokenizer
    image_tokenizer: object | None  # an ImageTokenizer, None when train.image_tokenizer is unset


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu") -> InferenceRun:
    """The model of `run_dir` with the text and image tokenizers named in its config."""
    from t2i_ds.data.images import load_image_tokenizer
    from t2i_ds.data.text_tokenizer import TextTokenizer

    model, vocab, cfg = load_model_for_inference(run_dir, checkpoint, device)
    spec = cfg.train.image_tokenizer
    image_tok = load_image_tokenizer(spec) if spec else None
    return InferenceRun(model, vocab, cfg, TextTokenizer(cfg.train.text_tokenizer or None), image_tok)


def text_rows_only(sd: dict[str, torch.Tensor], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Keep the text rows of the embedding and output: the checkpoint of a text LM of the same shape."""
    return {k: (v[: vocab.text_size].clone() if k in EMBED_KEYS else v) for k, v in sd.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="t2i_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="e.g. step_00001000 (default: newest complete)")
    p.add_argument("--out", required=True, help=".pt (open_lm {'state_dict': ...}) or .safetensors")
    p.add_argument("--text-rows-only", action="store_true", help="drop image and special rows (a text LM)")
    a = p.parse_args(argv)
    try:
        cfg = run_config(a.run_dir)
        ckpt = checkpoint_dir(a.run_dir, a.checkpoint)
    except (FileNotFoundError, ConfigError) as e:
        print(f"t2i_ds.export: error: {e}", file=sys.stderr)
        return 2
    sd = consolidated_state_dict(ckpt)
    if a.text_rows_only:
        sd = text_rows_only(sd, cfg.vocab.build())
    save_open_lm(sd, a.out)
    print(f"[t2i_ds] wrote {a.out} from {ckpt} ({sum(v.numel() for v in sd.values()):,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
