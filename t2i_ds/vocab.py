"""The text + image vocabulary and the training-sequence format (paper section 2.1).

One object owns every id range, so no size is ever written twice:

    [0, T)              text ids: GPT-NeoX BPE (50,277 real ids) in open_lm's padded table, T = 50,432
    [T, T + I)          image ids: image code c becomes T + c; I = 16,384 MoVQGAN codes
    [T + I, T + I + 6)  specials: <doc> </doc> <text> </text> <image> </image>

A text-to-image sample is

    <doc> <text> caption </text> <image> c_1 ... c_1024 </image> </doc> <pad> ...

padded to `seq_len` (1,152) model inputs. Targets are the inputs shifted by one; every target that
would be padding is `IGNORE` (never a loss target), so the pad id may be any id (by default NeoX's
`<|padding|>`, id 1). The last input position (`</doc>` in a full sample) predicts nothing.
With 1,024 image tokens and 6 specials, at most 1,152 - 1,024 - 6 = 122 caption tokens fit; longer
captions are truncated and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

IGNORE = -100  # target value that contributes no loss (torch's cross_entropy default)

SPECIAL_NAMES = ("<doc>", "</doc>", "<text>", "</text>", "<image>", "</image>")


MODALITY_NAMES = ("text", "image", "special")  # the loss's per-modality split (paper Fig. 4), by `modality_bounds`


@dataclass
class Sample:
    """One training sequence: `input_ids` [S] and `targets` [S] (int64, IGNORE where no loss)."""

    input_ids: np.ndarray
    targets: np.ndarray
    caption_truncated: bool = False


@dataclass(frozen=True)
class Vocab:
    """Id layout and sequence format. Defaults are the paper's; tests pass tiny sizes.

    Attributes:
        text_size: rows reserved for text ids (open_lm pads NeoX's 50,277 ids to 50,432).
        image_size: image codebook size (MoVQGAN: 16,384).
        image_tokens: tokens per image (MoVQGAN at 256x256: a 32x32 grid = 1,024).
        seq_len: model input length of one sample (paper: 1,152).
        pad_id: id placed in padded input positions; never a target.
        real_text_size: ids the text tokenizer can produce (NeoX: 50,277); rows above are unused.
    """

    text_size: int = 50_432
    image_size: int = 16_384
    image_tokens: int = 1_024
    seq_len: int = 1_152
    pad_id: int = 1
    real_text_size: int = 50_277

    def __post_init__(self) -> None:
        if self.text_size <= 0 or self.image_size <= 0 or self.image_tokens <= 0:
            raise ValueError(f"Vocab sizes must be positive, got {self}")
        if not 0 < self.real_text_size <= self.text_size:
            raise ValueError(
                f"Vocab.real_text_size={self.real_text_size} must be in (0, text_size={self.text_size}]"
            )
        if self.seq_len < self.image_tokens + 6:
            raise ValueError(
                f"Vocab.seq_len={self.seq_len} cannot hold {self.image_tokens} image tokens + 6 specials"
            )
        if not 0 <= self.pad_id < self.size:
            raise ValueError(f"Vocab.pad_id={self.pad_id} is outside [0, {self.size})")

    # ---- id ranges -------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.image_size

    @property
    def size(self) -> int:
        """Embedding / output rows: T + I + 6 (66,822 for the paper)."""
        return self.text_size + self.image_size + len(SPECIAL_NAMES)

    @property
    def modality_bounds(self) -> tuple[int, int]:
        """Increasing id bounds splitting [text | image | special]: (T, T + I)."""
        return (self.image_offset, self.special_offset)

    @property
    def max_caption_tokens(self) -> int:
        return self.seq_len - self.image_tokens - 6

    def special(self, name: str) -> int:
        return self.special_offset + SPECIAL_NAMES.index(name)

    @property
    def doc(self) -> int:
        return self.special("<doc>")

    @property
    def doc_end(self) -> int:
        return self.special("</doc>")

    @property
    def text(self) -> int:
        return self.special("<text>")

    @property
    def text_end(self) -> int:
        return self.special("</text>")

    @property
    def image(self) -> int:
        return self.special("<image>")

    @property
    def image_end(self) -> int:
        return self.special("</image>")

    def image_ids(self, codes: np.ndarray | Sequence[int]) -> np.ndarray:
        """Image codes [n] -> vocabulary ids T + code, with a range check."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.image_size):
            raise ValueError(
                f"image codes must lie in [0, {self.image_size}), got [{codes.min()}, {codes.max()}]"
            )
        return codes + self.image_offset

    # ---- sequences -------------------------------------------------------------------------
    def prompt(self, caption_ids: Sequence[int]) -> list[int]:
        """Generation prompt `<doc> <text> caption </text> <image>`; `[]` is the CFG-unconditional one."""
        caption = self._check_caption(caption_ids)[: self.max_caption_tokens]
        return [self.doc, self.text, *caption, self.text_end, self.image]

    def text_to_image(self, caption_ids: Sequence[int], codes: Sequence[int]) -> Sample:
        """`<doc> <text> caption </text> <image> codes </image> </doc>`, caption truncated to fit."""
        caption = self._check_caption(caption_ids)
        truncated = len(caption) > self.max_caption_tokens
        caption = caption[: self.max_caption_tokens]
        image = self._image_block(codes)
        tokens = [self.doc, self.text, *caption, self.text_end, *image, self.doc_end]
        return self._pad(tokens, truncated)

    def unconditional(self, codes: Sequence[int]) -> Sample:
        """`<doc> <image> codes </image> </doc>`: image tokens only, no text target anywhere."""
        return self._pad([self.doc, *self._image_block(codes), self.doc_end], False)

    def text_only(self, text_ids: Sequence[int]) -> Sample:
        """`<doc> <text> text </text> </doc>` for text-only mixing (forgetting mitigation)."""
        text = self._check_caption(text_ids)
        room = self.seq_len - 4
        tokens = [self.doc, self.text, *text[:room], self.text_end, self.doc_end]
        return self._pad(tokens, len(text) > room)

    def _image_block(self, codes: Sequence[int]) -> list[int]:
        codes = np.asarray(codes)
        if codes.shape != (self.image_tokens,):
            raise ValueError(f"expected {self.image_tokens} image codes, got shape {codes.shape}")
        return [self.image, *self.image_ids(codes).tolist(), self.image_end]

    def _check_caption(self, caption_ids: Sequence[int]) -> list[int]:
        caption = [int(t) for t in caption_ids]
        if caption and (min(caption) < 0 or max(caption) >= self.text_size):
            raise ValueError(f"caption ids must lie in [0, {self.text_size}), got {caption[:8]}...")
        return caption

    def _pad(self, tokens: list[int], truncated: bool) -> Sample:
        # tokens has at most seq_len ids; inputs = tokens padded to seq_len, targets = shift by one.
        n = len(tokens)
        assert n <= self.seq_len, (n, self.seq_len)
        input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        input_ids[:n] = tokens
        targets = np.full(self.seq_len, IGNORE, dtype=np.int64)
        targets[: n - 1] = tokens[1:]
        return Sample(input_ids, targets, truncated)

    def build(self, caption_ids: Sequence[int] | None, codes: Sequence[int]) -> Sample:
        """The sample for one pair: unconditional when `caption_ids is None`, else text-to-image."""
        return self.unconditional(codes) if caption_ids is None else self.text_to_image(caption_ids, codes)


def tiny_vocab(**overrides) -> Vocab:
    """A small vocabulary for tests and the `debug` preset: 300 text ids, 64 image codes, 16 tokens per image."""
    kwargs = dict(text_size=300, image_size=64, image_tokens=16, seq_len=40, pad_id=1, real_text_size=300)
    kwargs.update(overrides)
    return Vocab(**kwargs)
