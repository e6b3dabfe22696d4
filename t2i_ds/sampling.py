"""Sampling images from a trained model, with KV-cache decoding and classifier-free guidance.

For each caption the prompt is `vocab.prompt(caption)` = `<doc> <text> caption </text> <image>`; the
model then decodes exactly `vocab.image_tokens` steps, each sampled from the image ids only (the
other logits are never candidates), with temperature and top-k.

Classifier-free guidance (cfg_scale > 0): the unconditional prompt is the trained empty-caption one,
`vocab.prompt([])` = `<doc> <text> </text> <image>` (the caption-dropout samples must be built the
same way, `vocab.text_to_image([], codes)`), and

    logits = uncond + cfg_scale * (cond - uncond)

One batch, one KV cache, one forward per step (as LlamaGen, Janus, Liquid): a batch of b captions is
the rows [b conditional prompts; b unconditional prompts] (the latter only when cfg_scale > 0), each
LEFT-padded with `vocab.pad_id` to the batch's longest prompt, so every row's next token lands in the
same column. The model gets a key-padding mask over every key so far (padded keys are never attended)
and, with `rotary`, per-row positions that start each row's real tokens at 0, as if unpadded; the
(2b, I) logits are mixed for the guidance formula, and the sampled code is fed to both halves.
Captions of different lengths share a batch too (no grouping by length). A batch with no padding
(one prompt length, e.g. cfg_scale == 0 and equal captions) passes no mask at all, which is exactly the
unpadded computation and keeps mask-less flash kernels eligible on GPUs.

Two decode loops (`loop=`):

- "fast" (default): a preallocated KV cache written in place (`Transformer.allocate_cache`,
  `forward_static`: no per-step torch.cat), the LM head computing only the image rows, rotary tables
  built once per batch, and the fused sampling op `t2i::cfg_sample` (csrc/; pure-torch fallback
  `t2i_kernels.cfg_sample.cfg_sample_ref`). Its counter-based generator is keyed by (seed, caption
  index, step, column), so an image is a function of its caption, its caption index, the seed and the
  model only: not of its batch, batch size, row, rank or device. (Up to floating-point rounding of the
  logits between batch shapes, which Gumbel-max sampling turns into a different code only at an exact
  near-tie.) With `compile=` every step has the same shapes (prompts padded to the longest possible
  prompt, the last batch filled up to `batch_size`, attention over the whole cache under a mask), so
  `torch.compile(mode="reduce-overhead")` captures the step as one CUDA graph.
- "baseline": the previous loop, kept for comparison (benchmarks/bench_generate.py): caches grown by
  torch.cat, the full-vocabulary head, torch.multinomial from one torch.Generator per call, so a
  caption's image depends on its batch.

The command is t2i_ds.generate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from t2i_kernels.cfg_sample import resolve as resolve_sampler

from t2i_ds.model.transformer import padded_positions
from t2i_ds.vocab import Vocab

LOOPS = ("fast", "baseline")
COMPILE_DEFAULT = {"mode": "reduce-overhead", "fullgraph": True}  # CUDA graphs of the whole decode step


def cfg_prompt(vocab: Vocab) -> list[int]:
    """The unconditional prompt of classifier-free guidance: the trained empty-caption prefix."""
    return vocab.prompt([])


def sample_from_logits(logits: torch.Tensor, top_k: int | None, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """(B, K) logits -> (B,) int64 indices; top_k=1 is greedy (argmax)."""
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, K)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _image_logits(logits: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """(B, V) -> (B, I): keep the image ids only, i.e. every text and special id is excluded."""
    return logits[:, vocab.image_offset : vocab.special_offset]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> ids (B, L) left-padded with pad_id to the longest (or to `length`), and the mask (B, L) bool,
    True = real.

    The mask is None when every prompt has length L (nothing is padded).
    """
    L = max(len(p) for p in prompts) if length is None else length
    if any(len(p) > L for p in prompts):
        raise ValueError(f"a prompt is longer than the padded length {L}")
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)  # (B, L)
    if all(len(p) == L for p in prompts):
        return ids, None
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    mask = torch.arange(L, device=device)[None, :] >= (L - lengths)[:, None]  # (B, L)
    return ids, mask


@torch.no_grad()
def _sample_batch(
    model, vocab: Vocab, prompts: list[list[int]], cfg_scale: float, top_k: int | None, temperature: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """b prompts of any lengths -> (b, image_tokens) int64 codes; guided rows ride in the same forward."""
    device = next(model.parameters()).device
    b, guided = len(prompts), cfg_scale > 0
    rows = prompts + [cfg_prompt(vocab)] * b if guided else prompts  # [cond; uncond]: (R,) with R = b or 2b
    ids, mask = left_pad(rows, vocab.pad_id, device)  # (R, L), (R, L) or None
    if mask is not None:  # every key of the whole decode; step t attends the first L + t + 1 columns
        mask = torch.cat([mask, mask.new_ones(len(rows), vocab.image_tokens)], dim=1)  # (R, L + image_tokens)
    L = ids.shape[1]
    logits, cache = model.forward_with_cache(ids, key_padding_mask=None if mask is None else mask[:, :L])  # (R, V)
    codes = torch.empty(b, vocab.image_tokens, dtype=torch.long, device=device)
    for t in range(vocab.image_tokens):
        step = _image_logits(logits, vocab)  # (R, I)
        if guided:
            cond, uncond = step[:b], step[b:]  # (b, I) each
            step = uncond + cfg_scale * (cond - uncond)
        codes[:, t] = sample_from_logits(step, top_k, temperature, gen)
        if t + 1 == vocab.image_tokens:
            break  # </image> would follow; the last code needs no forward
        ids = codes[:, t : t + 1] + vocab.image_offset  # (b, 1)
        if guided:
            ids = ids.repeat(2, 1)  # (2b, 1): the same code continues the cond and the uncond row
        step_mask = None if mask is None else mask[:, : L + t + 1]  # (R, L + t + 1)
        logits, cache = model.forward_with_cache(ids, cache, key_padding_mask=step_mask)  # (R, V)
    return codes


def caption_keys(indices: Sequence[int], seed: int, device) -> torch.Tensor:
    """(b, 2) int64 [seed, caption index]: the per-caption key of the sampling op's generator."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return torch.tensor([[seed, int(i)] for i in indices], dtype=torch.int64, device=device)


class _FastDecoder:
    """The fast loop: preallocated cache, image-row head, the reproducible sampling op.

    The decode state lives in tensors updated in place (the code fed back, its cache column and rotary position,
    the written-column mask, the step counter). With `static`, the state and the cache are allocated once for
    the one batch shape and reused by every batch, so a compiled step (`step_fn`) sees the same tensors at the
    same addresses at every step of every batch (what CUDA graphs replay).
    """

    def __init__(self, model, vocab: Vocab, cfg_scale: float, top_k: int | None, temperature: float,
                 sample_impl: str, static: bool):
        self.model, self.vocab, self.cfg_scale, self.temperature = model, vocab, cfg_scale, temperature
        self.top_k = 0 if top_k is None else int(top_k)
        self.static = static
        self._sample = resolve_sampler(sample_impl)  # torch.ops.t2i.cfg_sample or cfg_sample_ref
        self.rows = (vocab.image_offset, vocab.special_offset)  # the head computes image ids only
        self.step_fn = self.step
        self._state: dict[tuple[int, int], dict] = {}  # static: (R, S) -> reused cache and state tensors

    def step(self, ids, cache, index, positions, mask, keys, step, kv_len: int | None):
        """One decode step: the forward of the fed-back code (R, 1), then sampling. (b,) int64 codes."""
        logits = self.model.forward_static(ids, cache, index, positions=positions, key_padding_mask=mask,
                                           kv_len=kv_len, rows=self.rows)  # (R, I)
        return self.sample(logits, keys, step)

    def sample(self, logits, keys, step) -> torch.Tensor:
        """(R, I) image logits -> (b,) codes, from the op (or its reference) resolved once in __init__."""
        return self._sample(logits, keys, step, 0, self.vocab.image_size, self.cfg_scale, self.temperature, self.top_k)

    def _allocate(self, R: int, S: int, device) -> dict:
        if self.static and (R, S) in self._state:
            return self._state[(R, S)]
        state = {
            "cache": self.model.allocate_cache(R, S),
            "keymask": torch.ones(R, S, dtype=torch.bool, device=device),  # True = a real, written key
            "fed": torch.empty(R, 1, dtype=torch.long, device=device),  # the code fed to the cond and uncond rows
            "index": torch.empty(1, dtype=torch.long, device=device),  # its cache column
            "pos": torch.empty(R, 1, dtype=torch.long, device=device),  # its rotary position
            "step": torch.empty((), dtype=torch.long, device=device),  # the sampling op's step counter
        }
        if self.static:
            if device.type == "cuda":  # mutated in place across CUDA-graph replays: addresses must not move
                for t in [*(x for kv in state["cache"].layers for x in (kv.k, kv.v)), *list(state.values())[1:]]:
                    torch._dynamo.mark_static_address(t)
            self._state[(R, S)] = state
        return state

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], keys: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
        """b prompts, keys (b, 2) -> (b, image_tokens) int64 codes. prompt_len: pad every prompt to it."""
        vocab, model = self.vocab, self.model
        device = next(model.parameters()).device
        b, guided = len(prompts), self.cfg_scale > 0
        rows = prompts + [cfg_prompt(vocab)] * b if guided else prompts  # [cond; uncond]: R = b or 2b rows
        ids, mask = left_pad(rows, vocab.pad_id, device, prompt_len)  # (R, L), (R, L) or None
        R, L, T = ids.shape[0], ids.shape[1], vocab.image_tokens
        S = L + T - 1  # cache columns: the prompt and every fed-back code but the last
        st = self._allocate(R, S, device)
        positions = padded_positions(mask) if mask is not None else torch.arange(L, device=device).expand(R, L)  # (R, L)
        st["step"].zero_()
        logits = model.forward_static(ids, st["cache"], torch.arange(L, device=device), positions=positions,
                                      key_padding_mask=mask, kv_len=L, rows=self.rows)  # (R, I): prefill
        codes = torch.empty(b, T, dtype=torch.long, device=device)
        codes[:, 0] = self.sample(logits, keys, st["step"])
        keymask = st["keymask"]
        keymask.fill_(True)
        if mask is not None:
            keymask[:, :L] = mask
        if self.static:
            keymask[:, L:] = False  # one more column becomes real at every step
        elif mask is None:
            keymask = None  # nothing padded: the unmasked attention path
        st["index"].fill_(L - 1)
        st["pos"].copy_(positions[:, -1:])
        for t in range(1, T):
            st["fed"].view(-1, b).copy_(codes[:, t - 1] + vocab.image_offset)  # (R / b, b): every half, same code
            st["index"] += 1
            st["pos"] += 1
            st["step"] += 1
            if self.static:
                keymask.index_fill_(1, st["index"], True)
                mask_t, kv_len = keymask, None
            else:
                mask_t, kv_len = (None if keymask is None else keymask[:, : L + t]), L + t
            codes[:, t] = self.step_fn(st["fed"], st["cache"], st["index"], st["pos"], mask_t, keys, st["step"], kv_len)
        return codes


@torch.no_grad()
def generate_images(
    model,
    vocab: Vocab,
    caption_ids_list: Sequence[Sequence[int]],
    *,
    cfg_scale: float = 0.0,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    indices: Sequence[int] | None = None,
    loop: str = "fast",
    sample_impl: str = "auto",
    compile: bool | dict = False,
) -> torch.Tensor:
    """Sample one image per caption: (N, image_tokens) int64 codes in [0, image_size), in input order.

    loop="fast": caption i is keyed by `indices[i]` (default: its position i in the list), and its image is a
    function of (model, caption, indices[i], seed, settings) only: regenerating caption 17 of a COCO run alone,
    in another batch or on another rank gives the same codes. A batch is up to `batch_size` consecutive captions
    of any lengths; with cfg_scale > 0 it runs 2 * batch_size rows (cond + uncond) per forward.
    sample_impl: "auto" (the C++/CUDA op when it builds, else the reference), "op" or "ref" (same codes).
    compile: False, True (torch.compile with mode="reduce-overhead", fullgraph: CUDA graphs on a GPU) or a dict of
    torch.compile keyword arguments; compiled steps have static shapes (see the module docstring).

    loop="baseline": the previous loop; the result depends on (captions, settings, seed, batch_size).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    device = next(model.parameters()).device
    prompts = [vocab.prompt(c) for c in caption_ids_list]
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} caption indices for {len(prompts)} captions")
    out = torch.empty(len(prompts), vocab.image_tokens, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        if loop == "baseline":
            gen = torch.Generator(device=device).manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                codes = _sample_batch(model, vocab, batch, cfg_scale, top_k, temperature, gen)  # (b, image_tokens)
                out[start : start + len(batch)] = codes.cpu()
            return out
        decoder = _make_decoder(model, vocab, cfg_scale, top_k, temperature, sample_impl, compile)
        prompt_len = vocab.max_caption_tokens + 4 if compile else None  # <doc> <text> caption </text> <image>
        for start in range(0, len(prompts), batch_size):
            batch, idx = prompts[start : start + batch_size], indices[start : start + batch_size]
            n = len(batch)
            if compile and n < batch_size:  # one batch shape: fill up with copies (their codes are dropped)
                batch, idx = batch + [batch[-1]] * (batch_size - n), idx + [idx[-1]] * (batch_size - n)
            codes = decoder(batch, caption_keys(idx, seed, device), prompt_len)  # (b, image_tokens)
            out[start : start + n] = codes[:n].cpu()
    finally:
        model.train(was_training)
    return out


def _make_decoder(model, vocab, cfg_scale, top_k, temperature, sample_impl, compile) -> _FastDecoder:
    if not compile:
        return _FastDecoder(model, vocab, cfg_scale, top_k, temperature, sample_impl, static=False)
    options = COMPILE_DEFAULT if compile is True else dict(compile)
    decoder = _FastDecoder(model, vocab, cfg_scale, top_k, temperature, sample_impl, static=True)
    decoder.step_fn = torch.compile(decoder.step, **options)
    return decoder


def save_grid(
    images: np.ndarray, path: str | Path, nrow: int = 8, captions: Sequence[str] | None = None, scale: int = 4
) -> None:
    """Write (N, H, W, 3) uint8 images as one PNG grid, each tile upscaled by `scale`, captions below."""
    n, h, w, _ = images.shape
    th, tw = h * scale, w * scale
    caption_h = 12 * _caption_lines(captions, tw) if captions else 0
    ncol = min(nrow, n)
    grid = Image.new("RGB", (ncol * (tw + 2), math.ceil(n / ncol) * (th + caption_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % ncol) * (tw + 2), (i // ncol) * (th + caption_h + 2)
        grid.paste(Image.fromarray(image).resize((tw, th), Image.NEAREST), (x, y))
        if captions:
            draw.multiline_text((x, y + th), _wrap(captions[i], tw), fill="black", spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _wrap(text: str, width_px: int, char_px: int = 6) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width_px // char_px:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def _caption_lines(captions: Sequence[str], width_px: int) -> int:
    return max(_wrap(c, width_px).count("\n") + 1 for c in captions)
