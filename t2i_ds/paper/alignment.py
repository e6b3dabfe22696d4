"""Image-text token contrastive alignment (paper section 3.2, Figure 7).

Each pair is reduced to two bag-of-words vectors:

    image:   e_img = normalize(mean_j  E_img[c_j])       c_j: the image's codes, E_img: [I, dim] trainable
    caption: e_txt = normalize(mean_k  E_txt[t_k])       t_k: caption text ids, E_txt: [T, dim] frozen

and trained with CLIP's symmetric InfoNCE over a batch of N pairs (N = 1,024 in the paper):

    logits = exp(s) * e_img @ e_txt^T                    (N, N), s = learnable log logit scale
    loss   = (CE(logits, arange N) + CE(logits^T, arange N)) / 2

s starts at log(1 / 0.07) and is clamped to [0, log 100] after every step, as CLIP does. E_img is
initialised like open_lm's new rows (trunc normal, std 1/sqrt(dim)); E_txt is the pre-trained
`tok_embeddings` text block. Only E_img and s are updated (AdamW).

The learned E_img is saved as `aligned_rows.safetensors` ("image_rows" [I, dim]); the trainer's
`aligned` initialisation reads it through `load_aligned_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from t2i_ds.model.checkpoint import ROWS_FILE, ROWS_KEY, new_rows
from t2i_ds.progress import Progress

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(s) at 100
REPORT_FILE = "nearest_tokens.md"


@dataclass
class AlignConfig:
    """Hyper-parameters of the alignment run.

    Attributes:
        batch_size: pairs per contrastive batch (paper: 1,024); clipped to the data size.
        steps: optimizer steps.
        lr: AdamW learning rate (the paper gives none; 1e-3 suits embedding rows of std 1/sqrt(dim)).
        weight_decay: AdamW decoupled weight decay on the image rows (0: the loss is scale-free).
        seed: image-row init, batch order.
        log_every: steps between TensorBoard scalars.
    """

    batch_size: int = 1024
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if min(self.batch_size, self.steps, self.log_every) <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"AlignConfig values must be positive: {self}")


class BagOfWordsAligner(nn.Module):
    """Frozen text rows (buffer), trainable image rows and log logit scale."""

    def __init__(self, text_rows: torch.Tensor, image_size: int, seed: int = 0):
        super().__init__()
        self.register_buffer("text_rows", text_rows.detach().float().clone())  # (T, dim), frozen
        gen = torch.Generator().manual_seed(seed)
        self.image_rows = nn.Parameter(new_rows(self.text_rows, image_size, "random", gen))  # (I, dim)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def image_embed(self, codes: torch.Tensor) -> torch.Tensor:
        # codes (B, n) -> (B, dim) as code frequencies (B, I) @ rows (I, dim): never builds (B, n, dim)
        # (8 GB at the paper's 1,024 x 1,024 x 2,048), and its backward is a deterministic matmul
        ones = torch.full(codes.shape, 1.0 / codes.shape[1], device=codes.device)
        freq = torch.zeros(len(codes), len(self.image_rows), device=codes.device).scatter_add_(1, codes, ones)
        return F.normalize(freq @ self.image_rows, dim=-1)

    def text_embed(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # flat caption ids (L,), bag starts (B,) -> (B, dim)
        return F.normalize(F.embedding_bag(ids, self.text_rows, offsets, mode="mean"), dim=-1)

    def forward(self, codes: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, in-batch image->text top-1 accuracy)."""
        img, txt = self.image_embed(codes), self.text_embed(ids, offsets)
        logits = self.logit_scale.exp() * img @ txt.T  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return loss, (logits.argmax(1) == labels).float().mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    @property
    def temperature(self) -> float:
        return math.exp(-self.logit_scale.item())


@dataclass
class AlignResult:
    image_rows: torch.Tensor  # (I, dim) fp32, on CPU
    temperature: float
    losses: list[float] = field(default_factory=list)  # one per step


def flatten_captions(captions: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (flat ids (L,), offsets (B,)) for embedding_bag."""
    lengths = torch.tensor([len(c) for c in captions])
    offsets = torch.cumsum(lengths, 0) - lengths
    ids = torch.tensor([t for c in captions for t in c], dtype=torch.long)
    return ids.to(device), offsets.to(device)


def check_pairs(codes: torch.Tensor, captions: Sequence[Sequence[int]], image_size: int, text_size: int) -> None:
    if codes.ndim != 2 or len(codes) != len(captions):
        raise ValueError(f"need codes (N, n_img) and N captions, got {tuple(codes.shape)} and {len(captions)}")
    if any(len(c) == 0 for c in captions):
        raise ValueError("empty captions have no bag-of-words embedding; drop them first")
    if int(codes.min()) < 0 or int(codes.max()) >= image_size:
        raise ValueError(f"image codes must lie in [0, {image_size})")
    if min(min(c) for c in captions) < 0 or max(max(c) for c in captions) >= text_size:
        raise ValueError(f"caption ids must lie in [0, {text_size})")


def train_alignment(
    text_rows: torch.Tensor,
    codes: torch.Tensor,
    captions: Sequence[Sequence[int]],
    image_size: int,
    cfg: AlignConfig | None = None,
    writer=None,
    device: str | torch.device = "cpu",
) -> AlignResult:
    """Learn image rows (I, dim) so that bag-of-words image and caption embeddings match (CLIP loss).

    text_rows: (T, dim) pre-trained text embedding rows (frozen). codes: (N, n_img) integer image
    codes in [0, image_size). captions: N non-empty lists of text ids in [0, T). writer: an optional
    SummaryWriter that receives `align/loss`, `align/temperature` and `align/accuracy`.
    """
    cfg = cfg or AlignConfig()
    check_pairs(codes, captions, image_size, len(text_rows))
    model = BagOfWordsAligner(text_rows, image_size, cfg.seed).to(device)
    opt = torch.optim.AdamW([model.image_rows, model.logit_scale], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = batch_indices(len(codes), min(cfg.batch_size, len(codes)), cfg.steps, cfg.seed)
    losses = []
    bar = Progress(cfg.steps, "align", "steps")
    for step, idx in enumerate(batches, start=1):
        ids, offsets = flatten_captions([captions[i] for i in idx.tolist()], model.text_rows.device)
        loss, acc = model(codes[idx].long().to(device), ids, offsets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_()
        losses.append(loss.item())  # alignment is tiny next to a step; one sync per step is fine
        if writer is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            writer.add_scalar("align/loss", losses[-1], step)
            writer.add_scalar("align/temperature", model.temperature, step)
            writer.add_scalar("align/accuracy", acc.item(), step)
        bar.set_postfix(f"loss {losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    return AlignResult(model.image_rows.detach().cpu(), model.temperature, losses)


def batch_indices(n: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of distinct indices: shuffled epochs, the last partial batch of each dropped."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


@torch.no_grad()
def nearest_text_tokens(
    image_rows: torch.Tensor, text_rows: torch.Tensor, codes: Sequence[int], k: int = 5, text_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k text ids for each image code: (similarities (n, k), text ids (n, k)).

    text_limit restricts candidates to ids [0, text_limit) (e.g. the tokenizer's real ids).
    """
    text = F.normalize(text_rows[:text_limit].float(), dim=-1)  # (T', dim)
    img = F.normalize(image_rows[torch.as_tensor(list(codes))].float(), dim=-1)  # (n, dim)
    return (img @ text.T).topk(k, dim=-1)


def nearest_report(sims: torch.Tensor, ids: torch.Tensor, codes: Sequence[int], decode=None) -> str:
    """Markdown table: image code | nearest text tokens (cosine)."""
    lines = ["| image code | nearest text tokens (cosine) |", "|---:|---|"]
    for code, row_s, row_i in zip(codes, sims.tolist(), ids.tolist()):
        cells = [f"{_token_text(i, decode)} ({s:.3f})" for s, i in zip(row_s, row_i)]
        lines.append(f"| {code} | {', '.join(cells)} |")
    return "\n".join(lines)


def _token_text(token_id: int, decode) -> str:
    text = repr(decode([token_id])) if decode is not None else f"#{token_id}"
    return text.replace("|", "\\|")


def save_aligned_rows(path: str | Path, image_rows: torch.Tensor, metadata: dict[str, object]) -> Path:
    """Write {"image_rows": (I, dim) fp32} with string metadata (safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in metadata.items()}
    save_file({ROWS_KEY: image_rows.detach().float().cpu().contiguous()}, str(path), metadata=meta)
    return path


# ---- the whole analysis: token shards + a text LM -> aligned rows, events and the nearest-token report ------
@dataclass(frozen=True)
class AlignVocab:
    """The id ranges the alignment reads: text rows of the checkpoint, the tokenizer's real ids, image codes."""

    text_size: int
    real_text_size: int
    image_size: int


def read_pairs(spec: str, max_pairs: int | None = None) -> tuple[torch.Tensor, list[list[int]], int]:
    """(codes (N, n_img) int32, N captions, number of empty captions dropped) from token shards."""
    from t2i_ds.data.shards import list_shards, read_shard

    codes, captions, empty = [], [], 0
    for path in list_shards(spec):
        for s in read_shard(path):
            if len(s.caption_ids) == 0:
                empty += 1
                continue
            codes.append(np.asarray(s.codes, dtype=np.int32))
            captions.append(np.asarray(s.caption_ids).tolist())
            if max_pairs is not None and len(captions) >= max_pairs:
                return torch.from_numpy(np.stack(codes)), captions, empty
    if not captions:
        raise ValueError(f"no image-caption pairs with a non-empty caption in {spec!r}")
    return torch.from_numpy(np.stack(codes)), captions, empty


def read_text_rows(checkpoint: str, text_size: int) -> torch.Tensor:
    """The first `text_size` rows of the checkpoint's `tok_embeddings.weight` (the text block)."""
    from t2i_ds.model.checkpoint import read_state_dict

    rows = read_state_dict(checkpoint)["tok_embeddings.weight"]
    if len(rows) < text_size:
        raise ValueError(f"{checkpoint}: tok_embeddings has {len(rows)} rows, fewer than text_size={text_size}")
    return rows[:text_size].float()


def report_codes(codes: torch.Tensor, n: int, seed: int) -> list[int]:
    """A seeded sample of `n` distinct image codes among those present in the data, sorted."""
    present = torch.unique(codes.long())
    gen = torch.Generator().manual_seed(seed)
    return sorted(present[torch.randperm(len(present), generator=gen)[:n]].tolist())


def load_decoder(path: str | None):
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).decode


def run_alignment(shards: str, checkpoint: str, out: Path, cfg: AlignConfig, vocab: AlignVocab, tokenizer: str | None = None,
                  max_pairs: int | None = None, n_report: int = 32, top_k: int = 5, device: str = "cpu") -> Path:
    """Train the image rows on the pairs of `shards` against the text rows of `checkpoint`; write into `out` the
    TensorBoard events (align/loss, align/temperature, align/accuracy), aligned_rows.safetensors and
    nearest_tokens.md. Returns the rows' path."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    codes, captions, empty = read_pairs(shards, max_pairs)
    print(f"align: {len(captions):,} pairs ({empty:,} with an empty caption dropped), device {device}")
    text_rows = read_text_rows(checkpoint, vocab.text_size)
    with SummaryWriter(str(out)) as writer:
        result = train_alignment(text_rows, codes, captions, vocab.image_size, cfg, writer, device)
    meta = {**vars(cfg), "checkpoint": checkpoint, "pairs": len(captions), "final_loss": result.losses[-1],
            "temperature": result.temperature, "text_size": vocab.text_size, "image_size": vocab.image_size}
    rows_path = save_aligned_rows(out / ROWS_FILE, result.image_rows, meta)
    sample = report_codes(codes, n_report, cfg.seed)
    sims, ids = nearest_text_tokens(result.image_rows, text_rows, sample, top_k, vocab.real_text_size)
    report = f"final loss {result.losses[-1]:.4f}, temperature {result.temperature:.4f}\n\n"
    report += nearest_report(sims, ids, sample, load_decoder(tokenizer))
    (out / REPORT_FILE).write_text(report + "\n")
    print(report)
    print(f"align: wrote {rows_path} and {out / REPORT_FILE}")
    return rows_path
