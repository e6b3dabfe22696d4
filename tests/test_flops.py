"""Model FLOPs per token and their split by target modality (text / image / special / pad)."""

import pytest
import torch

from t2i_ds.model import model_preset
from t2i_ds.trainer.flops import COMPUTE_CLASSES, flops_per_token, modality_flops, modality_positions
from t2i_ds.vocab import IGNORE, Vocab, tiny_vocab


def test_modality_positions_classify_targets_and_weight_attention_by_position():
    v = tiny_vocab()  # text [0, 300), image [300, 364), specials from 364
    t = v.image_offset
    targets = torch.tensor([[5, t + 1, t + 2, v.doc_end, IGNORE, IGNORE]])  # (1, 6)
    got = modality_positions(targets, v.modality_bounds)  # (4, 2): [count, sum of (i + 1/2)]
    expect = torch.tensor([[1, 0.5], [2, 1.5 + 2.5], [1, 3.5], [2, 4.5 + 5.5]], dtype=torch.float64)
    assert COMPUTE_CLASSES == ("text", "image", "special", "pad") and torch.equal(got, expect)


def test_modality_flops_add_up_to_flops_per_token_and_pad_costs_more_than_its_share():
    """A full paper-sized sample: the classes sum to flops_per_token x S; padding, at the end of the
    sequence where causal attention is dearest, takes a larger share of FLOPs than of positions."""
    v = Vocab()
    args = model_preset("open_lm_1b", vocab_size=v.size)
    s = v.text_to_image(list(range(2, 22)), [0] * v.image_tokens)  # 20 caption tokens
    targets = torch.from_numpy(s.targets)[None]  # (1, 1152)
    pos = modality_positions(targets, v.modality_bounds).tolist()
    flops = modality_flops(pos, args)
    assert sum(flops.values()) == pytest.approx(flops_per_token(args, v.seq_len) * v.seq_len, rel=1e-12)
    counts = dict(zip(COMPUTE_CLASSES, (n for n, _ in pos)))
    # targets: 20 caption ids, 1,024 codes, 5 specials (<text> </text> <image> </image> </doc>); the rest is pad
    assert (counts["text"], counts["image"], counts["special"]) == (20, v.image_tokens, 5)
    assert counts["pad"] == v.seq_len - 20 - v.image_tokens - 5
    pad_share = flops["pad"] / sum(flops.values())
    assert pad_share > counts["pad"] / v.seq_len
