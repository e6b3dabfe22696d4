"""Build the model from the config and wrap it for training: the only place that touches DeepSpeed.

Order (each step needs the previous one):
  1. build the architecture for the Vocab (vocab_size from the Vocab, never a literal); under ZeRO-3
     inside `deepspeed.zero.Init`, so every parameter is partitioned as soon as its module exists and no
     rank ever holds the whole model (a 7B model starts on ranks that could not hold it)
  2. initialise: open_lm init from a seed, or a pre-trained open_lm checkpoint with the vocabulary
     extended (rows random / mean / aligned). Under ZeRO-3 the init is the unpartitioned build's, bit for
     bit, on any device (`init_partitioned`): one parameter at a time is gathered
     (`deepspeed.zero.GatheredParameters`), filled on rank 0 from the CPU generator in the same order, and
     re-partitioned
  3. freeze by preset (requires_grad by open_lm name): frozen parameters get no optimizer state and
     no gradient reduction, because DeepSpeed only sees the trainable ones
  4. activation checkpointing switch (per block, inside the model)
  5. optimizer (AdamW over trainable parameters; t2i_ds.trainer.optim) and the LR schedule
  6. deepspeed.initialize (ZeRO stage, precision, offload from the ds_config)
  7. torch.compile through the engine, if asked
"""

from __future__ import annotations

import torch
import torch.nn as nn

from t2i_ds.config import Config, ConfigError
from t2i_ds.model import Transformer, build_model, model_preset
from t2i_ds.model.checkpoint import checked_state_dict, extend_vocab, load_aligned_rows, load_into, read_state_dict
from t2i_ds.model.freeze import apply_freeze
from t2i_ds.model.head import LMHead
from t2i_ds.trainer.optim import make_optimizer
from t2i_ds.trainer.schedule import cosine_with_warmup
from t2i_ds.vocab import Vocab


def model_args(cfg: Config, vocab: Vocab):
    overrides = {**cfg.model.overrides, "vocab_size": vocab.size}
    try:
        return model_preset(cfg.model.preset, **overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from None


def pretrained_state(cfg: Config, vocab: Vocab, dim: int) -> dict:
    """The open_lm checkpoint's state dict with its vocabulary extended to vocab.size rows (a text LM: text_size
    rows), or as it is when it already has vocab.size rows (a t2i model, e.g. an exported transformers directory)."""
    sd = read_state_dict(cfg.init.checkpoint)
    rows_in_ckpt = sd["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in sd else -1
    if rows_in_ckpt == vocab.size and cfg.init.new_rows == "random":
        return sd  # every row trained already: nothing to extend
    if rows_in_ckpt != vocab.text_size:
        raise ConfigError(
            f"init.checkpoint={cfg.init.checkpoint} has {rows_in_ckpt} embedding rows but vocab.text_size={vocab.text_size}"
            + (f" (or vocab.size={vocab.size} with init.new_rows=random)" if rows_in_ckpt == vocab.size else "")
        )
    rows = None
    if cfg.init.new_rows == "aligned":
        rows = load_aligned_rows(cfg.init.aligned_rows, vocab, dim, seed=cfg.init.seed)
    init = "random" if cfg.init.new_rows == "aligned" else cfg.init.new_rows
    return extend_vocab(sd, vocab.size, init=init, seed=cfg.init.seed, rows=rows)


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def mixed_precision(ds_config: dict) -> bool:
    """bf16 or fp16 enabled (DeepSpeed then wraps the optimizer in one that checks the gradient norm)."""
    return any(ds_config.get(p, {}).get("enabled") is True for p in ("bf16", "fp16"))


def build_initialised_model(cfg: Config, vocab: Vocab, ds_config: dict | None = None) -> Transformer:
    """Steps 1-4: architecture, init, freezing, activation checkpointing (partitioned under ZeRO-3)."""
    args = model_args(cfg, vocab)
    torch.manual_seed(cfg.init.seed)
    partitioned = zero_stage(ds_config) == 3
    if partitioned:
        model = build_partitioned(args, vocab, ds_config, init=cfg.init.mode == "random")
    else:
        model = build_model(args, vocab.modality_bounds)
    if cfg.init.mode == "pretrained":
        state = pretrained_state(cfg, vocab, args.dim)
        load_partitioned(model, state) if partitioned else load_into(model, state)
    model.freeze_report = apply_freeze(model, cfg.train.freeze)
    model.grad_checkpointing = cfg.model.grad_checkpointing
    return model


def build_partitioned(args, vocab: Vocab, ds_config: dict, init: bool) -> Transformer:
    """The model built under `deepspeed.zero.Init` (each module's parameters partitioned when its constructor
    returns, on the accelerator, in the ds_config's dtype), with the values `build_model` gives on CPU."""
    import deepspeed

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # the constructors' draws (on the accelerator) are undone
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(args, vocab.modality_bounds, init=False)
    if init:
        init_partitioned(model)
    return model


def restore_torch_linear() -> None:
    """Give torch.nn.functional.linear back to torch. `deepspeed.zero.Init` swaps in its memory-efficient ZeRO-3
    linear for the whole process and keeps it "unless manually reset" (DeepSpeed's words); the engine's layers
    need it only while it trains. Left in place, code that runs later in the same process compiles the wrapper:
    TorchScript then builds modules that cannot be saved ("strides() called on an undefined Tensor")."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    original = getattr(ZeroInit, "linear_bk", None)  # DeepSpeed's own backup, set by the first swap
    if original is not None:
        torch.nn.functional.linear = original


def init_partitioned(model: Transformer) -> None:
    """The unpartitioned build's init, bit for bit, whatever the device and dtype: rank 0 replays on CPU the
    random draws that building the model on CPU makes (torch's default init of each nn.Linear and nn.Embedding,
    in construction order, on a throwaway copy), then runs the model's `init_steps` in order from the same
    generator, one gathered parameter at a time, in fp32, copied into the partitioned parameter. The other
    ranks take rank 0's generator state, as if they had drawn too."""
    from deepspeed.runtime.zero import GatheredParameters

    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        replay_construction_draws(model)
    for p, fill in model.init_steps():
        with GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if rank0:
                full = torch.empty(p.shape, dtype=torch.float32)  # the gathered shape, on CPU
                fill(full)
                p.copy_(full)
    state = [torch.get_rng_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])


NO_DEFAULT_DRAWS = (nn.LayerNorm, nn.RMSNorm, nn.Identity, LMHead)  # constructors that draw no random numbers


def replay_construction_draws(model: torch.nn.Module) -> None:
    """Draw what constructing `model` on CPU draws, module by module in construction (= registration) order."""
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.Linear):
            nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)  # kaiming_uniform_ (+ bias uniform_)
        elif isinstance(m, nn.Embedding):
            nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)  # normal_
        elif own and not isinstance(m, NO_DEFAULT_DRAWS):
            raise TypeError(f"{name} ({type(m).__name__}): unknown constructor draws; add its replay here so "
                            "ZeRO-3 construction keeps the unpartitioned init")


def load_partitioned(model: Transformer, state_dict: dict) -> None:
    """`load_into` for a model partitioned by zero.Init: the same strict check against the full shapes, then
    one gathered parameter at a time is copied (rank 0's copy is kept) and re-partitioned."""
    from deepspeed.runtime.zero import GatheredParameters

    shapes = {n: tuple(p.ds_shape) for n, p in model.named_parameters(remove_duplicate=False)}
    sd = checked_state_dict(model, state_dict, shapes)
    for name, p in model.named_parameters():
        with GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(sd[name])
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in sd and name not in params:
                b.copy_(sd[name])


def resident_parameter_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: full tensors plus ZeRO-3 partitions (a partitioned parameter's
    full tensor is empty until gathered)."""
    return sum(p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in model.parameters())


def wrap_with_deepspeed(model: Transformer, cfg: Config, ds_config: dict, total_steps: int):
    """Steps 5-7. Returns the DeepSpeed engine (its .module is the model)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    stage0 = zero_stage(ds_config) == 0
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    o = cfg.optim
    sched = lambda opt: cosine_with_warmup(opt, o.warmup_steps, total_steps, o.min_lr_ratio)  # noqa: E731
    if offload:  # ZeRO-Offload needs DeepSpeed's CPU Adam; the schedule stays ours
        ds_config = {**ds_config, "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}}}
        optimizer = None
    else:
        checked = stage0 and not mixed_precision(ds_config)
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
        if checked:  # CheckedAdamW clips (to optim.grad_clip) and skips non-finite steps itself
            ds_config["gradient_clipping"] = 0.0
        optimizer = make_optimizer(params, cfg, checked)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=sched, config=ds_config
    )
    if stage0 and engine.dp_world_size == 1:
        # stage 0's all-reduce over one rank is a flatten and a copy back of every gradient, 0.2 s of a 3.6 s step at
        # dim 512 on one CPU core; DeepSpeed turns it off the same way without a process group (and ZeRO-1/2/3 keep
        # it: their gradient epilogue runs in it)
        engine.enable_backward_allreduce = False
    if cfg.model.compile:
        engine.compile()
    return engine
