"""A trained run, loaded for sampling and evaluation: its config, its newest complete checkpoint, its model.

ZeRO-1/2/3 checkpoints hold the fp32 master weights in optimizer partitions; DeepSpeed's own `zero_to_fp32`
consolidates them (any world size) into one state dict with open_lm's key names. A stage-0 fp32 checkpoint has
no partitions: its weights are the module's, in mp_rank_00_model_states.pt. Used by generate, eval, the demo
and export (t2i_ds.export writes that state dict as an open_lm checkpoint).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_ds.config import Config, from_dict
from t2i_ds.model import Transformer
from t2i_ds.model.checkpoint import build_loaded
from t2i_ds.trainer.checkpointing import complete_checkpoints, find_resume, is_complete, saved_world_size
from t2i_ds.trainer.parallelize import model_args
from t2i_ds.vocab import Vocab


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a t2i_ds run directory")
    return from_dict(json.loads(path.read_text()))


def checkpoint_dir(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The named checkpoint (which must verify), or the newest complete one that verifies against its manifest
    (a damaged newer one is named in a warning on stderr); CheckpointError names the damaged file otherwise."""
    root = Path(run_dir) / "checkpoints"
    if checkpoint:
        path = root / checkpoint if not Path(checkpoint).is_dir() else Path(checkpoint)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint")
        return find_resume(str(path), root)
    if not complete_checkpoints(root):
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    return find_resume("auto", root, warn=lambda m: print(f"[t2i_ds] {m.replace('resuming from', 'using')}", file=sys.stderr))


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a (possibly ZeRO-partitioned) DeepSpeed checkpoint directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if saved_world_size(ckpt) is None:  # stage 0 in fp32: the module's weights are the master weights
        sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def load_model_for_inference(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu") -> tuple[Transformer, Vocab, Config]:
    """The trained model (eval mode) with its Vocab and Config; built without a random init (build_loaded)."""
    cfg = run_config(run_dir)
    vocab = cfg.vocab.build()
    args = model_args(cfg, vocab).replace(loss_impl="torch" if device == "cpu" else "auto")
    model = build_loaded(args, vocab.modality_bounds, consolidated_state_dict(checkpoint_dir(run_dir, checkpoint)))
    return model.to(device).eval(), vocab, cfg


@dataclass
class InferenceRun:
    """A trained run ready for sampling: model (eval), its Vocab and Config, and its tokenizers."""

    model: Transformer
    vocab: Vocab
    cfg: Config
    text_tokenizer: object  # t2i_ds.data.tokenizers.TextTokenizer
    image_tokenizer: object | None  # an ImageTokenizer, None when train.image_tokenizer is unset


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu") -> InferenceRun:
    """The model of `run_dir` with the text and image tokenizers named in its config."""
    from t2i_ds.data.image_tokenizers import load_image_tokenizer
    from t2i_ds.data.tokenizers import TextTokenizer
    from t2i_ds.trainer import jit_cache

    jit_cache.use_own_cache()  # the sampling op builds into this environment's cache ...
    jit_cache.check_build_locks(warn=lambda m: print(m, file=sys.stderr))  # ... a killed build's lock: removed, rebuilt
    model, vocab, cfg = load_model_for_inference(run_dir, checkpoint, device)
    spec = cfg.train.image_tokenizer
    image_tok = load_image_tokenizer(spec) if spec else None
    return InferenceRun(model, vocab, cfg, TextTokenizer(cfg.train.text_tokenizer or None), image_tok)
