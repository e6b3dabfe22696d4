"""Deterministic synthetic sequences: the same global batch at every world size.

Global batch of step k is generated from (seed, k); rank r takes its rows in a fixed layout, so a
2-rank run and a single-process run with gradient accumulation see the same sequences. Used by
the golden-loss tests (ZeRO-2 vs ZeRO-3 vs single process) and throughput benchmarks.
Samples have the real layout (`<doc> <text> caption </text> <image> codes </image> </doc>`) and a
learnable link: the image codes are a function of the caption.
"""

from __future__ import annotations

import numpy as np
import torch

from t2i_ds.vocab import Vocab


class SyntheticBatches:
    """Iterator of micro-batches {"input_ids", "targets"} (B, S) int64 for one rank."""

    def __init__(self, vocab: Vocab, micro_batch: int, grad_accum: int, rank: int, world_size: int, seed: int = 0):
        self.vocab, self.micro, self.accum = vocab, micro_batch, grad_accum
        self.rank, self.world, self.seed = rank, world_size, seed
        self.step, self.micro_step = 0, 0  # position: next (optimizer step, micro-step)
        self.last_keys: list[str] = []  # sample ids of the last micro-batch: "synthetic:<step>:<row>"

    def _sample(self, step: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        v = self.vocab
        rng = np.random.default_rng([self.seed, step, row])
        n_cap = int(rng.integers(1, max(2, min(12, v.max_caption_tokens) + 1)))
        caption = rng.integers(2, min(v.real_text_size, 1000), n_cap)
        base = (caption[0] * 7 + np.arange(v.image_tokens) * caption[-1]) % v.image_size
        noise = rng.integers(0, v.image_size, v.image_tokens)
        codes = np.where(rng.random(v.image_tokens) < 0.2, noise, base)
        s = v.text_to_image(caption.tolist(), codes)
        return s.input_ids, s.targets

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # rows of the global batch owned by this rank and micro-step
        first = self.rank * self.micro * self.accum + self.micro_step * self.micro
        rows = [self._sample(self.step, first + i) for i in range(self.micro)]
        self.last_keys = [f"synthetic:{self.step}:{first + i}" for i in range(self.micro)]
        self.micro_step += 1
        if self.micro_step == self.accum:
            self.step, self.micro_step = self.step + 1, 0
        return {
            "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
            "targets": torch.from_numpy(np.stack([r[1] for r in rows])),
        }

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
