"""Text probes of forgetting (paper Table 1): greedy completions, few-shot translation, held-out loss.

    probes = TextProbes(text_tokenizer, vocab)
    result = probes.run(model)            # eval mode + no_grad inside; the model's mode is restored
    result.metrics  # {"probe/heldout_loss", "probe/heldout_ppl", "probe/translation_exact_match"}
    result.texts    # {"probe/relativity", "probe/translation", "probe/translation_table"}

Completions are greedy over real text ids only ([0, vocab.real_text_size)), from the plain prompt
text as the pre-trained LM saw it (no <doc>/<text> specials unless `text_segment=True`). The
translation prompt is the GPT-3 format that the paper's Table 1 flattens onto one line:

    Translate English to French:
    sea otter => loutre de mer
    peppermint => menthe poivrée
    plush girafe => girafe peluche
    cheese =>

Exact match compares the first line of the completion with the reference (case-insensitive) for
every held-out query of `assets/en_fr_words.tsv`. The held-out loss is the mean cross-entropy over
the text targets of `assets/heldout_text.txt`, packed into `vocab.text_only` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from t2i_ds.vocab import IGNORE, Vocab

TRANSLATION_TASK = "Translate English to French:"
RELATIVITY_PROMPT = "Simply put, the theory of relativity states that"
N_SHOTS = 3  # the paper's three in-context examples


def read_asset(name: str) -> str:
    return (resources.files("t2i_ds") / "assets" / name).read_text(encoding="utf-8")


def translation_pairs() -> list[tuple[str, str]]:
    """The shipped English -> French pairs, in file order (the first N_SHOTS are the examples)."""
    rows = [line.split("\t") for line in read_asset("en_fr_words.tsv").splitlines() if line and not line.startswith("#")]
    return [(en.strip(), fr.strip()) for en, fr in rows]


def translation_prompt(shots: Sequence[tuple[str, str]], query: str) -> str:
    """GPT-3's few-shot format: task line, one `en => fr` example per line, then `query =>`."""
    lines = [TRANSLATION_TASK, *(f"{en} => {fr}" for en, fr in shots), f"{query} =>"]
    return "\n".join(lines)


def paper_prompts() -> dict[str, str]:
    """The two prompts of the paper's Table 1."""
    shots = translation_pairs()[:N_SHOTS]
    return {"relativity": RELATIVITY_PROMPT, "translation": translation_prompt(shots, "cheese")}


def exact_match(completion: str, reference: str) -> bool:
    """The completion's first line, stripped, equals the reference (case-insensitive)."""
    first = completion.lstrip(" ").split("\n")[0].strip()
    return first.casefold() == reference.strip().casefold()


@dataclass
class ProbeResult:
    metrics: dict[str, float]  # TensorBoard scalars
    texts: dict[str, str]  # TensorBoard text (markdown)


def unwrap(model: nn.Module) -> nn.Module:
    """The open_lm Transformer inside a DeepSpeed engine / DDP wrapper."""
    return getattr(model, "module", model)


@torch.no_grad()
def greedy_complete(
    model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, allowed: int, stop: Callable[[list[int]], bool] | None = None
) -> list[int]:
    """Greedy decoding with the KV cache over ids [0, allowed); ends early when `stop(new_ids)` holds."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)  # (1, P)
    past, new = None, []
    for _ in range(max_new_tokens):
        logits, past = model.forward_with_cache(ids, past)  # (1, V)
        new.append(int(logits[0, :allowed].argmax()))  # one host sync per token: probes are rare
        if stop is not None and stop(new):
            break
        ids = torch.tensor([[new[-1]]], device=device)
    return new


class TextProbes:
    """Forgetting probes run by the trainer every N steps (rank 0).

    text_tokenizer: a `tokenizers.Tokenizer` or a Hugging Face tokenizer (encode / decode).
    prompts: name -> prompt for free completions (default: the paper's two).
    heldout_text: plain text for the held-out loss (default: assets/heldout_text.txt).
    pairs: (english, french) pairs; the first `n_shots` are the examples, the rest the queries.
    text_segment: wrap prompts as `<doc> <text> prompt` (the training format) instead of plain text.
    """

    def __init__(
        self,
        text_tokenizer,
        vocab: Vocab,
        prompts: dict[str, str] | None = None,
        heldout_text: str | None = None,
        pairs: Sequence[tuple[str, str]] | None = None,
        n_shots: int = N_SHOTS,
        max_new_tokens: int = 32,
        max_answer_tokens: int = 12,
        batch_size: int = 8,
        text_segment: bool = False,
    ):
        self.tokenizer, self.vocab = text_tokenizer, vocab
        self.prompts = dict(paper_prompts() if prompts is None else prompts)
        pairs = list(translation_pairs() if pairs is None else pairs)
        self.shots, self.queries = pairs[:n_shots], pairs[n_shots:]
        self.max_new_tokens, self.max_answer_tokens, self.batch_size = max_new_tokens, max_answer_tokens, batch_size
        self.prefix = [vocab.doc, vocab.text] if text_segment else []
        self.heldout = self._heldout_samples(read_asset("heldout_text.txt") if heldout_text is None else heldout_text)

    # ---- tokenizer ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        enc = self.tokenizer.encode(text)
        return list(getattr(enc, "ids", enc))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- probes --------------------------------------------------------------------------------
    def run(self, model: nn.Module) -> ProbeResult:
        """All probes in eval mode under no_grad; the model's train/eval mode is restored."""
        model = unwrap(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._run(model)
        finally:
            model.train(was_training)

    def _run(self, model: nn.Module) -> ProbeResult:
        loss = self.heldout_loss(model)
        texts = {f"probe/{name}": self.complete(model, prompt) for name, prompt in self.prompts.items()}
        answers = [self.complete(model, translation_prompt(self.shots, en), answer=True) for en, _ in self.queries]
        hits = [exact_match(a, fr) for a, (_, fr) in zip(answers, self.queries)]
        texts["probe/translation_table"] = self._table(answers, hits)
        metrics = {
            "probe/heldout_loss": loss,
            "probe/heldout_ppl": math.exp(min(loss, 50.0)),
            "probe/translation_exact_match": float(np.mean(hits)) if hits else float("nan"),
        }
        return ProbeResult(metrics, texts)

    def complete(self, model: nn.Module, prompt: str, answer: bool = False) -> str:
        """Greedy completion text; an answer stops at its first newline (or max_answer_tokens)."""
        stop = (lambda new: "\n" in self.decode(new)) if answer else None
        n = self.max_answer_tokens if answer else self.max_new_tokens
        ids = greedy_complete(model, self.prefix + self.encode(prompt), n, self.vocab.real_text_size, stop)
        return self.decode(ids)

    def heldout_loss(self, model: nn.Module) -> float:
        """Mean cross-entropy (nats) over the text targets of the held-out samples."""
        device = next(model.parameters()).device
        inputs, targets = self.heldout
        total = count = 0.0
        for start in range(0, len(inputs), self.batch_size):
            x = inputs[start : start + self.batch_size].to(device)
            y = targets[start : start + self.batch_size].to(device)
            out = model(x, y)
            total += out.loss_sum.item()
            count += out.count.item()
        return total / count

    # ---- helpers -------------------------------------------------------------------------------
    def _heldout_samples(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out text -> text_only samples (n, S); targets keep text ids only (specials IGNORE)."""
        ids = self.encode(text)
        room = self.vocab.seq_len - 4  # <doc> <text> ... </text> </doc>
        samples = [self.vocab.text_only(ids[i : i + room]) for i in range(0, len(ids), room)]
        inputs = torch.from_numpy(np.stack([s.input_ids for s in samples]))
        targets = torch.from_numpy(np.stack([s.targets for s in samples]))
        targets = torch.where(targets < self.vocab.image_offset, targets, IGNORE)
        if not (targets >= 0).any():
            raise ValueError("the held-out text has no text targets")
        return inputs, targets

    def _table(self, answers: list[str], hits: list[bool]) -> str:
        rows = ["| English | reference | completion | match |", "|---|---|---|---|"]
        for (en, fr), a, hit in zip(self.queries, answers, hits):
            shown = a.split("\n")[0].strip().replace("|", "\\|")
            rows.append(f"| {en} | {fr} | {shown} | {'yes' if hit else 'no'} |")
        return "\n".join(rows)
