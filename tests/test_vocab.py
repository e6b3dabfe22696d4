"""Vocabulary id layout and the paper's sequence format, with the real GPT-NeoX BPE."""

import numpy as np
import pytest
import torch

from t2i_ds.vocab import IGNORE, Vocab, tiny_vocab

CAPTIONS = [
    "A red double-decker bus drives past Big Ben on a rainy afternoon in London.",
    "two dogs playing with a frisbee on the beach at sunset",
    "Close-up photograph of a bowl of ramen with a soft-boiled egg, scallions and nori.",
]


def test_paper_layout():
    v = Vocab()
    assert v.size == 66_822 and v.image_offset == 50_432 and v.special_offset == 66_816
    assert v.max_caption_tokens == 122
    assert [v.doc, v.doc_end, v.text, v.text_end, v.image, v.image_end] == list(range(66_816, 66_822))
    assert v.image_ids([0, 16_383]).tolist() == [50_432, 66_815]
    with pytest.raises(ValueError, match="image codes"):
        v.image_ids([16_384])


def test_real_captions_layout(neox_tokenizer):
    v = Vocab()
    codes = np.random.default_rng(0).integers(0, v.image_size, v.image_tokens)
    for caption in CAPTIONS:
        ids = neox_tokenizer.encode(caption).ids
        assert 5 < len(ids) < 40 and max(ids) < v.real_text_size
        s = v.text_to_image(ids, codes)
        n = 6 + len(ids) + 1024
        assert s.input_ids.shape == s.targets.shape == (1152,) and s.input_ids.dtype == np.int64
        expect = [v.doc, v.text, *ids, v.text_end, v.image, *(codes + v.image_offset), v.image_end, v.doc_end]
        assert s.input_ids[:n].tolist() == expect
        assert (s.input_ids[n:] == v.pad_id).all()
        assert s.targets[: n - 1].tolist() == expect[1:]
        assert (s.targets[n - 1 :] == IGNORE).all()
        assert not s.caption_truncated
        # round trip through the tokenizer
        assert neox_tokenizer.decode(s.input_ids[2 : 2 + len(ids)].tolist()) == caption


def test_long_and_empty_caption(neox_tokenizer):
    v = Vocab()
    codes = np.zeros(v.image_tokens, dtype=np.int64)
    long_ids = neox_tokenizer.encode(" ".join(CAPTIONS * 6)).ids
    assert len(long_ids) > v.max_caption_tokens
    s = v.build(long_ids, codes)
    assert s.caption_truncated
    assert s.input_ids[2 : 2 + 122].tolist() == long_ids[:122]
    assert s.input_ids[124] == v.text_end and s.input_ids[-1] == v.doc_end  # exactly full
    assert (s.targets[:-1] != IGNORE).all() and s.targets[-1] == IGNORE
    empty = v.build(neox_tokenizer.encode("").ids, codes)
    assert not empty.caption_truncated
    assert empty.input_ids[:3].tolist() == [v.doc, v.text, v.text_end]


def test_unconditional_has_no_text_targets():
    v = tiny_vocab()
    codes = np.arange(v.image_tokens) % v.image_size
    s = v.build(None, codes)
    assert s.input_ids[:2].tolist() == [v.doc, v.image]
    targets = s.targets[s.targets != IGNORE]
    assert targets.tolist() == [v.image, *(v.image_offset + codes), v.image_end, v.doc_end]  # no text id anywhere


def test_modality_bounds_split_the_ids():
    v = tiny_vocab()
    ids = torch.tensor([0, 299, 300, 363, 364, 369])
    assert torch.bucketize(ids, torch.tensor(v.modality_bounds), right=True).tolist() == [0, 0, 1, 1, 2, 2]


def test_cfg_prompt_is_the_trained_empty_caption():
    # The sampler's unconditional prompt must be exactly the prefix of a trained empty-caption sample.
    v = tiny_vocab()
    s = v.text_to_image([], np.zeros(v.image_tokens, dtype=np.int64))
    assert v.prompt([]) == s.input_ids[:4].tolist()
    assert v.prompt([5, 6]) == [v.doc, v.text, 5, 6, v.text_end, v.image]


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        Vocab(seq_len=100)
    with pytest.raises(ValueError, match="caption ids"):
        tiny_vocab().text_to_image([10_000], np.zeros(16, dtype=np.int64))
    with pytest.raises(ValueError, match="expected 16 image codes"):
        tiny_vocab().unconditional(np.zeros(3, dtype=np.int64))
