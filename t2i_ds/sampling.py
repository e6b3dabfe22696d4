"""Sampling images from a trained model, with KV-cache decoding and classifier-free guidance.

For each caption the prompt is `vocab.prompt(caption)` = `<doc> <text> caption </text> <image>`; the
model then decodes exactly `vocab.image_tokens` steps, each sampled from the image ids only (the
other logits are never candidates), with temperature and top-k, from a seeded torch.Generator.

Classifier-free guidance (cfg_scale > 0): the unconditional prompt is the trained empty-caption one,
`vocab.prompt([])` = `<doc> <text> </text> <image>` (the caption-dropout samples must be built the
same way, `vocab.text_to_image([], codes)`), and

    logits = uncond + cfg_scale * (cond - uncond)

One batch, one KV cache, one forward per step (as LlamaGen, Janus, Liquid): a batch of b captions is
the rows [b conditional prompts; b unconditional prompts] (the latter only when cfg_scale > 0), each
LEFT-padded with `vocab.pad_id` to the batch's longest prompt, so every row's next token lands in the
same column. The model gets a key-padding mask over every key so far (padded keys are never attended)
and, with `rotary`, per-row positions that start each row's real tokens at 0, as if unpadded; the
(2b, V) logits are split into their halves for the guidance formula, and the sampled code is fed to
both halves. Captions of different lengths share a batch too (no grouping by length). A batch with
no padding (one prompt length, e.g. cfg_scale == 0 and equal captions) passes no mask at all, which
is exactly the unpadded computation and keeps mask-less flash kernels eligible on GPUs.

The command is t2i_ds.generate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from t2i_ds.vocab import Vocab


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> ids (B, L) left-padded with pad_id to the longest, and the mask (B, L) bool, True = real.

    The mask is None when every prompt has length L (nothing is padded).
    """
    L = max(len(p) for p in prompts)
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
) -> torch.Tensor:
    """Sample one image per caption: (N, image_tokens) int64 codes in [0, image_size), in input order.

    The result is a function of (model, captions, settings, seed, batch_size): each batch draws from
    one generator seeded once, in a fixed order of batches. A batch is up to `batch_size` consecutive
    captions of any lengths; with cfg_scale > 0 it runs 2 * batch_size rows (cond + uncond) per forward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    device = next(model.parameters()).device
    prompts = [vocab.prompt(c) for c in caption_ids_list]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(len(prompts), vocab.image_tokens, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            codes = _sample_batch(model, vocab, batch, cfg_scale, top_k, temperature, gen)  # (b, image_tokens)
            out[start : start + len(batch)] = codes.cpu()
    finally:
        model.train(was_training)
    return out


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
