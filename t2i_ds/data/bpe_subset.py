"""A byte-level BPE tokenizer restricted to the tokens a corpus uses, renumbered densely.

A small model cannot afford NeoX's 50,277 text rows on a CPU (the output layer would hold most of its
compute), and most of them never occur in a small corpus. `subset_bpe` keeps

    keep = the `top` most frequent ids of the corpus  ∪  `required` ids (e.g. every caption id)
           ∪  their merge ancestors (the parts of every merge that makes a kept token, recursively)
           ∪  the byte alphabet (single-symbol tokens)  ∪  the added tokens among them (<|endoftext|>, ...)

renumbers them 0..K-1 in the order of their original ids, and drops every merge whose parts or result
are not kept. The result is the same BPE on any text whose original tokens are all kept (each merge BPE
applies there makes a kept token or one of its ancestors, so no applied merge was dropped; the order of
the rest is unchanged): the ids are `old_ids[new]`. Other text still encodes losslessly, into more and
shorter tokens (at worst single bytes).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


@dataclass
class BpeSubset:
    """The restricted tokenizer (tokenizer.json content) and `old_ids[new_id]` -> original id."""

    tokenizer_json: dict
    old_ids: np.ndarray  # (K,) int64, increasing

    @property
    def size(self) -> int:
        return len(self.old_ids)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.tokenizer_json, ensure_ascii=False), encoding="utf-8")
        return path


def _merges(model: dict) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer)
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def ancestor_closure(tokens: set[str], merges: list[tuple[str, str]]) -> set[str]:
    """`tokens` and the parts of every merge that makes one of them, recursively."""
    makers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        makers.setdefault(a + b, []).append((a, b))
    closed, todo = set(tokens), list(tokens)
    while todo:
        for a, b in makers.get(todo.pop(), ()):
            for part in (a, b):
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return closed


def count_ids(tokenizer, texts: Iterable[str], batch: int = 4096) -> Counter:
    """Occurrences of each id of a `tokenizers.Tokenizer` over `texts` (no special tokens added)."""
    counts: Counter = Counter()
    texts = list(texts)
    for i in range(0, len(texts), batch):
        for enc in tokenizer.encode_batch(texts[i : i + batch], add_special_tokens=False):
            counts.update(enc.ids)
    return counts


def subset_bpe(tokenizer_json: dict, counts: Counter, top: int, required: Iterable[int] = ()) -> BpeSubset:
    """Restrict a byte-level BPE tokenizer.json to the ids of `counts` (see the module docstring)."""
    tj = copy.deepcopy(tokenizer_json)
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"subset_bpe needs a BPE tokenizer, got model type {model.get('type')!r}")
    id_to_token = {i: t for t, i in model["vocab"].items()} | {a["id"]: a["content"] for a in tj["added_tokens"]}
    merges = _merges(model)
    chosen = {i for i, _ in counts.most_common(top)} | set(required)
    unknown = sorted(i for i in chosen if i not in id_to_token)
    if unknown:
        raise ValueError(f"ids {unknown[:8]} are not in the tokenizer")
    tokens = ancestor_closure({id_to_token[i] for i in chosen}, merges)
    tokens |= {t for t in model["vocab"] if len(t) == 1}  # the byte alphabet: every text stays encodable
    tokens |= {a["content"] for a in tj["added_tokens"] if a["id"] in chosen or a["special"]}
    old_ids = np.array(sorted({model["vocab"].get(t, -1) for t in tokens} - {-1}
                              | {a["id"] for a in tj["added_tokens"] if a["content"] in tokens}), dtype=np.int64)
    new_of_old = {int(old): new for new, old in enumerate(old_ids)}
    model["vocab"] = {t: new_of_old[i] for t, i in model["vocab"].items() if i in new_of_old}
    kept_merges = [(a, b) for a, b in merges if a in tokens and b in tokens and a + b in tokens]
    model["merges"] = [f"{a} {b}" for a, b in kept_merges] if model["merges"] and isinstance(model["merges"][0], str) \
        else [[a, b] for a, b in kept_merges]
    tj["added_tokens"] = [{**a, "id": new_of_old[a["id"]]} for a in tj["added_tokens"] if a["id"] in new_of_old]
    return BpeSubset(tj, old_ids)
