"""open_lm <-> Hugging Face transformers: a checkpoint `AutoModelForCausalLM.from_pretrained` opens with no custom code.

The open_lm block is transformers' `StableLmForCausalLM` tensor for tensor (LayerNorm with bias, SwiGLU,
half-split RoPE, untied head, pre-norm sequential residual, no Linear biases):

    open_lm                                   transformers (StableLm / Llama)
    tok_embeddings.weight                     model.embed_tokens.weight
    layers.{i}.attention.in_proj.weight       model.layers.{i}.self_attn.{q,k,v}_proj.weight   rows [0:d], [d:2d], [2d:3d]
    layers.{i}.attention.out_proj.weight      model.layers.{i}.self_attn.o_proj.weight
    layers.{i}.feed_forward.w12.weight        model.layers.{i}.mlp.{gate,up}_proj.weight       rows [0:h] gate, [h:2h] up
    layers.{i}.feed_forward.w3.weight         model.layers.{i}.mlp.down_proj.weight
    layers.{i}.attention_norm.{weight,bias}   model.layers.{i}.input_layernorm.{weight,bias}
    layers.{i}.ffn_norm.{weight,bias}         model.layers.{i}.post_attention_layernorm.{weight,bias}
    norm.{weight,bias}                        model.norm.{weight,bias}
    output.weight                             lm_head.weight

Which transformers class, by ModelArgs (checked against t2i_ds.model.layers):
- norm_type "layer_norm": StableLm, layer_norm_eps = norm_eps. "gain_only_layer_norm": StableLm with zero biases
  (LayerNorm(x) * w + 0 is the gain-only norm exactly). "rms_norm": Llama (RMSNorm in fp32, then the gain).
- pos_embed "rotary": rope_theta = rotary_theta, partial_rotary_factor 1.0 (open_lm rotates the full head_dim,
  half-split convention, as transformers' rotate_half). "head_rotary" (the released 1B; attention scores equal
  NoPE's, see layers.RotaryEmbedding) and "none": StableLm with partial_rotary_factor 0 (no dimension rotated).
  The `inv_freq` buffers are not exported (transformers builds its own); importing adds the model's back.
- Not representable, refused with the reason: qk_norm (open_lm normalises the full q/k vector; StableLm's
  qk_layernorm is per head), post_embed_norm, rms_norm with head_rotary/none (Llama always rotates).

The image vocabulary and specials go into config.json under "t2i_ds" (the Vocab's fields, the id ranges, the
special ids by name, the ModelArgs), with bos = <doc>, eos = </doc>, pad = vocab.pad_id. Weights are fp32
safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch

from t2i_ds.atomic import atomic_path
from t2i_ds.model.args import ModelArgs
from t2i_ds.vocab import SPECIAL_NAMES, Vocab

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
T2I_KEY = "t2i_ds"  # config.json's entry with the vocabulary and the open_lm ModelArgs


class NotExportable(ValueError):
    """A ModelArgs option transformers' StableLm / Llama cannot express exactly."""


def hf_architecture(args: ModelArgs) -> str:
    """'stablelm' or 'llama' for `args`; NotExportable names the option that neither expresses."""
    if args.qk_norm:
        raise NotExportable("qk_norm: open_lm normalises the full q and k vectors; StableLm's qk_layernorm is per head")
    if args.post_embed_norm:
        raise NotExportable("post_embed_norm: no transformers decoder of this shape has a norm after the embedding")
    if args.norm_type == "rms_norm":
        if args.pos_embed != "rotary":
            raise NotExportable(f"rms_norm with pos_embed={args.pos_embed!r}: Llama always rotates by position")
        return "llama"
    return "stablelm"


def hf_config(args: ModelArgs, vocab: Vocab | None = None) -> dict:
    """config.json of the transformers model equal to open_lm `args` (+ the t2i vocabulary when given)."""
    arch = hf_architecture(args)
    common = {
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_heads,
        "hidden_act": "silu", "max_position_embeddings": args.seq_len, "tie_word_embeddings": args.weight_tying,
        "attention_dropout": 0.0, "torch_dtype": "float32", "use_cache": True,
    }
    if arch == "llama":
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "rms_norm_eps": args.norm_eps,
               "attention_bias": False, "mlp_bias": False, "head_dim": args.head_dim,
               "rope_parameters": {"rope_type": "default", "rope_theta": args.rotary_theta}}
    else:
        rotary = 1.0 if args.pos_embed == "rotary" else 0.0  # head_rotary / none: attention scores of NoPE
        cfg = {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", **common,
               "layer_norm_eps": args.norm_eps, "use_qkv_bias": False, "qk_layernorm": False,
               "use_parallel_residual": False, "hidden_dropout": 0.0,
               "rope_parameters": {"rope_type": "default", "rope_theta": args.rotary_theta,
                                   "partial_rotary_factor": rotary}}
    t2i = {"model_args": dataclasses.asdict(args)}
    if vocab is not None:
        if vocab.size != args.vocab_size:
            raise ValueError(f"vocab.size={vocab.size} != ModelArgs.vocab_size={args.vocab_size}")
        cfg.update(bos_token_id=vocab.doc, eos_token_id=vocab.doc_end, pad_token_id=vocab.pad_id)
        t2i.update(vocab=dataclasses.asdict(vocab), image_offset=vocab.image_offset,
                   special_offset=vocab.special_offset,
                   specials={name: vocab.special(name) for name in SPECIAL_NAMES})
    cfg[T2I_KEY] = t2i
    return cfg


def _layer_map(i: int) -> list[tuple[str, str]]:
    """(open_lm suffix, transformers suffix) of the one-to-one tensors of layer i."""
    o, h = f"layers.{i}.", f"model.layers.{i}."
    pairs = [("attention.out_proj.weight", "self_attn.o_proj.weight"), ("feed_forward.w3.weight", "mlp.down_proj.weight")]
    for norm_o, norm_h in (("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
        pairs += [(f"{norm_o}.weight", f"{norm_h}.weight"), (f"{norm_o}.bias", f"{norm_h}.bias")]
    return [(o + a, h + b) for a, b in pairs]


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """open_lm state dict -> transformers keys (in_proj and w12 split; inv_freq dropped; zero biases added for a
    gain-only LayerNorm). The split pieces are copies (safetensors stores no two tensors over one storage); the
    other tensors are the input's own (no copy)."""
    arch = hf_architecture(args)
    d, hid = args.dim, args.ffn_hidden
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not args.weight_tying:
        out["lm_head.weight"] = sd["output.weight"]
    pairs = [("norm.bias", "model.norm.bias")]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        q, k, v = sd[p + "attention.in_proj.weight"].split(d, dim=0)  # 3 x (d, d)
        gate, up = sd[p + "feed_forward.w12.weight"].split(hid, dim=0)  # 2 x (hidden, d)
        h = f"model.layers.{i}."
        pieces = {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                  h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up}
        out.update({name: t.clone() for name, t in pieces.items()})
        pairs += _layer_map(i)
    for o, h in pairs:
        if o in sd:
            out[h] = sd[o]
        elif o.endswith(".bias") and arch == "stablelm":  # gain-only LayerNorm: StableLm's bias is zero
            out[h] = torch.zeros_like(sd[o[: -len("bias")] + "weight"])
    return {k: v if v.is_meta else v.detach().to("cpu").contiguous() for k, v in out.items()}  # meta: names, shapes


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers keys -> open_lm keys (q/k/v and gate/up concatenated). Norm biases are kept unless the model
    has none (gain-only / RMS), in which case they must be zero. No inv_freq (load_into adds the model's)."""
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    sd["output.weight"] = hf["model.embed_tokens.weight"] if args.weight_tying else hf["lm_head.weight"]
    pairs = [("norm.bias", "model.norm.bias")]
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        sd[p + "attention.in_proj.weight"] = torch.cat([hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        sd[p + "feed_forward.w12.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], dim=0)
        pairs += _layer_map(i)
    has_bias = args.norm_type == "layer_norm"
    for o, h in pairs:
        if h not in hf:
            continue
        if o.endswith(".bias") and not has_bias:
            if torch.count_nonzero(hf[h]):
                raise NotExportable(f"{h} is not zero but norm_type={args.norm_type!r} has no bias")
            continue
        sd[o] = hf[h]
    return sd


def model_args_from_hf(cfg: Mapping) -> ModelArgs:
    """ModelArgs of a transformers config.json: ours (the "t2i_ds" entry) when present, else derived from a
    StableLm or Llama config of this shape (full rotary or none, no qkv bias, sequential residual)."""
    if T2I_KEY in cfg and "model_args" in cfg[T2I_KEY]:
        return ModelArgs(**cfg[T2I_KEY]["model_args"])
    kind = cfg.get("model_type")
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    common = dict(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                  vocab_size=cfg["vocab_size"], seq_len=cfg.get("max_position_embeddings", 2048),
                  rotary_theta=float(theta), weight_tying=bool(cfg.get("tie_word_embeddings", False)))
    problems = []
    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r} (open_lm's SwiGLU is silu)")
    if kind == "stablelm":
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
        problems += [name for name in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual") if cfg.get(name)]
        if factor not in (0.0, 1.0):
            problems.append(f"partial_rotary_factor={factor} (open_lm rotates all of head_dim or none)")
        args = ModelArgs(**common, norm_type="layer_norm", norm_eps=cfg.get("layer_norm_eps", 1e-5),
                         pos_embed="rotary" if factor == 1.0 else "none")
    elif kind == "llama":
        problems += [name for name in ("attention_bias", "mlp_bias") if cfg.get(name)]
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type={rope.get('rope_type')!r}")
        args = ModelArgs(**common, norm_type="rms_norm", norm_eps=cfg.get("rms_norm_eps", 1e-6), pos_embed="rotary")
    else:
        raise NotExportable(f"model_type={kind!r}: only stablelm and llama checkpoints map onto open_lm")
    if args.ffn_hidden != cfg["intermediate_size"]:
        problems.append(f"intermediate_size={cfg['intermediate_size']} (open_lm's SwiGLU has {args.ffn_hidden} at "
                        f"dim {args.dim})")
    if problems:
        raise NotExportable(f"{kind} checkpoint is not an open_lm model: " + "; ".join(problems))
    return args


def is_hf_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def read_hf(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """A transformers checkpoint directory (config.json + model.safetensors or sharded safetensors) ->
    open_lm state dict (memory-mapped tensors) and its ModelArgs."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG).read_text())
    args = model_args_from_hf(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has a config.json but no *.safetensors weights")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    return from_hf_state_dict(hf, args), args


def save_hf(sd: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike, vocab: Vocab | None = None,
            text_tokenizer: str | os.PathLike | None = None) -> Path:
    """Write `out_dir` with config.json, model.safetensors (fp32), generation_config.json and, given a text
    tokenizer (a tokenizer.json or a tokenizer directory), its files: `AutoTokenizer.from_pretrained(out_dir)`
    reads the text side (ids [0, text_size)); image and special ids are in config.json's "t2i_ds"."""
    from safetensors.torch import save_file

    cfg = hf_config(args, vocab)
    hf = to_hf_state_dict(sd, args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.float() for k, v in hf.items()}, str(tmp), metadata={"format": "pt"})
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if text_tokenizer:
        write_text_tokenizer(text_tokenizer, out, vocab)
    (out / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")  # last: a directory with config.json is complete
    return out


def write_text_tokenizer(source: str | os.PathLike, out_dir: Path, vocab: Vocab | None) -> None:
    """The text tokenizer's files in `out_dir`: a directory is copied file by file; a tokenizer.json becomes a
    PreTrainedTokenizerFast directory (tokenizer.json + tokenizer_config.json)."""
    source = Path(source)
    if source.is_dir():
        for f in source.iterdir():
            if f.is_file() and f.name not in (CONFIG, WEIGHTS, "generation_config.json"):
                shutil.copy2(f, out_dir / f.name)
        return
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(source))
    if vocab is not None:
        tok.model_max_length = vocab.seq_len
    tok.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------------------------------------------
# The peer baseline: transformers' generate() on an exported checkpoint, with classifier-free guidance over image ids
# (tests check it gives t2i_ds.sampling's greedy codes; benchmarks/bench_peers.py times it)
# ----------------------------------------------------------------------------------------------------------------

HF_CFG_MODES = ("guidance", "doubled")


def _image_cfg_processor(b: int, scale: float, lo: int, hi: int):
    """A LogitsProcessor over a doubled batch [b cond; b uncond]: both halves get uncond + scale * (cond - uncond)
    on the image ids [lo, hi) and -inf elsewhere, so a greedy step feeds the same code to both halves."""
    from transformers import LogitsProcessor

    class ImageCFG(LogitsProcessor):
        def __call__(self, input_ids, scores):  # scores (2b, V)
            cond, uncond = scores[:b, lo:hi], scores[b:, lo:hi]  # (b, I) each
            out = torch.full_like(scores, float("-inf"))
            out[:, lo:hi] = (uncond + scale * (cond - uncond)).repeat(2, 1)  # (2b, I)
            return out

    return ImageCFG()


@torch.no_grad()
def hf_generate_codes(hf_model, vocab: Vocab, captions: list[list[int]], cfg_scale: float, mode: str = "guidance",
                      ) -> torch.Tensor:
    """Greedy image codes (b, image_tokens) from transformers' `generate()` (KV cache on), prompts as
    t2i_ds.sampling builds them (`vocab.prompt`, left-padded), unconditional prompt `vocab.prompt([])`.

    mode "guidance": transformers' own CFG (`guidance_scale` + `negative_prompt_ids`: a second forward over the
    unconditional rows per step, on log-softmaxed logits, which shifts each row by a constant: same argmax), the
    non-image ids removed with `suppress_tokens`. mode "doubled": one forward over [cond; uncond] rows per step,
    CFG and the image-id restriction in one logits processor (the form t2i_ds itself runs).
    """
    if mode not in HF_CFG_MODES:
        raise ValueError(f"mode must be one of {HF_CFG_MODES}, got {mode!r}")
    from transformers import GenerationConfig

    device = hf_model.device
    prompts = [vocab.prompt(c) for c in captions]
    b, T, lo, hi = len(prompts), vocab.image_tokens, vocab.image_offset, vocab.special_offset
    gen = GenerationConfig(max_new_tokens=T, min_new_tokens=T, do_sample=False, use_cache=True,
                           pad_token_id=vocab.pad_id, eos_token_id=None, bos_token_id=vocab.doc)
    kwargs = {}
    if mode == "guidance" and cfg_scale > 0:
        gen.guidance_scale = float(cfg_scale)
        kwargs["negative_prompt_ids"] = torch.tensor([vocab.prompt([])] * b, device=device)
    rows = prompts + [vocab.prompt([])] * b if mode == "doubled" and cfg_scale > 0 else prompts
    L = max(len(p) for p in rows)
    ids = torch.tensor([[vocab.pad_id] * (L - len(p)) + list(p) for p in rows], device=device)  # (R, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in rows], device=device)  # (R, L)
    if len(rows) > b:
        kwargs["logits_processor"] = [_image_cfg_processor(b, float(cfg_scale), lo, hi)]
    else:
        gen.suppress_tokens = [i for i in range(vocab.size) if not lo <= i < hi]
    out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **kwargs)  # (R, L + T)
    return (out[:b, L:] - lo).cpu()
