"""Sampling images from a trained model, with KV-cache decoding and classifier-free guidance.

For each caption the prompt is `vocab.prompt(caption)` = `<doc> <text> caption </text> <image>`; the
model then decodes exactly `vocab.image_tokens` steps, each sampled from the image ids only (the
other logits are never candidates), with temperature and top-k, from a seeded torch.Generator.

Classifier-free guidance (cfg_scale > 0): the unconditional prompt is the trained empty-caption one,
`vocab.prompt([])` = `<doc> <text> </text> <image>` (the caption-dropout samples must be built the
same way, `vocab.text_to_image([], codes)`), and

    logits = uncond + cfg_scale * (cond - uncond)

Conditional rows of one batch share a prompt length (captions are grouped by length), so no padding
or attention mask is needed. The unconditional rows have a shorter prompt; sharing one forward with
them would need a key-padding mask that the model's attention does not take, so each guided step
runs the conditional and the unconditional rows as two calls with two KV caches.

CLI:  python -m t2i_ds.generate --checkpoint RUN_DIR --captions "a red circle ..." --out grid.png
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
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


@torch.no_grad()
def _sample_batch(
    model, vocab: Vocab, prompts: torch.Tensor, cfg_scale: float, top_k: int | None, temperature: float, gen: torch.Generator
) -> torch.Tensor:
    """(B, L) prompts of one length -> (B, image_tokens) int64 codes."""
    B = prompts.shape[0]
    guided = cfg_scale > 0
    logits, cache = model.forward_with_cache(prompts)  # (B, V)
    if guided:
        uncond = torch.tensor([cfg_prompt(vocab)], device=prompts.device).expand(B, -1)  # (B, 4)
        logits_u, cache_u = model.forward_with_cache(uncond)  # (B, V)
    codes = torch.empty(B, vocab.image_tokens, dtype=torch.long, device=prompts.device)
    for t in range(vocab.image_tokens):
        step = _image_logits(logits, vocab)  # (B, I)
        if guided:
            cond_u = _image_logits(logits_u, vocab)
            step = cond_u + cfg_scale * (step - cond_u)
        codes[:, t] = sample_from_logits(step, top_k, temperature, gen)
        if t + 1 == vocab.image_tokens:
            break  # </image> would follow; the last code needs no forward
        ids = codes[:, t : t + 1] + vocab.image_offset  # (B, 1)
        logits, cache = model.forward_with_cache(ids, cache)
        if guided:
            logits_u, cache_u = model.forward_with_cache(ids, cache_u)
    return codes


def _batches_by_prompt_length(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of prompts grouped by length, in chunks of at most batch_size (input order kept inside)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    return [idx[s : s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]


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
    one generator seeded once, in a fixed order of batches.
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
        for idx in _batches_by_prompt_length(prompts, batch_size):
            batch = torch.tensor([prompts[i] for i in idx], device=device)  # (b, L)
            out[idx] = _sample_batch(model, vocab, batch, cfg_scale, top_k, temperature, gen).cpu()
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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory of a trained model")
    p.add_argument("--captions", nargs="*", default=[], help="captions to draw")
    p.add_argument("--captions_file", help="a text file with one caption per line")
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.add_argument("--cfg_scale", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nrow", type=int, default=8)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Load a run, tokenise the captions, sample, decode, write a grid."""
    from t2i_ds.data.demo_tokenizer import to_uint8
    from t2i_ds.export import load_run  # lazy: DeepSpeed is heavy

    args = _parse_args(argv)
    captions = list(args.captions)
    if args.captions_file:
        captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
    if not captions:
        raise SystemExit("no captions: pass --captions or --captions_file")
    run = load_run(args.checkpoint)  # .model, .vocab, .text_tokenizer, .image_tokenizer
    if run.image_tokenizer is None:
        raise SystemExit(f"{args.checkpoint}: the run's config names no train.image_tokenizer to decode with")
    ids = run.text_tokenizer.encode_batch(captions)
    codes = generate_images(
        run.model, run.vocab, ids, cfg_scale=args.cfg_scale, top_k=args.top_k,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
    )
    images = to_uint8(run.image_tokenizer.decode(codes.to(next(run.model.parameters()).device)))
    save_grid(images, args.out, nrow=args.nrow, captions=captions)
    print(f"wrote {len(captions)} images to {args.out}")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.generate", main)
