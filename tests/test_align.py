"""Contrastive image-text token alignment (paper section 3.2): planted pairs are recovered, rows reload."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from t2i_ds.paper.align import main as align_main
from t2i_ds.data.shards import ShardSample, write_shard
from t2i_ds.paper.alignment import (
    MAX_LOGIT_SCALE,
    AlignConfig,
    BagOfWordsAligner,
    nearest_text_tokens,
    save_aligned_rows,
    train_alignment,
)
from t2i_ds.model.checkpoint import ROWS_KEY, extend_vocab, load_aligned_rows, save_open_lm
from t2i_ds.vocab import tiny_vocab

VOCAB = tiny_vocab()  # 300 text ids, 64 image codes, 16 codes per image
DIM = 32
from t2i_ds.data.tokenizers import DEFAULT_TEXT_TOKENIZER as NEOX_BPE
PLANT = 100  # image code c is planted as text token PLANT + c


def planted_pairs(n: int, seed: int = 0):
    """Captions hold f(c) = PLANT + c for half of the image's codes, plus 2 unrelated text tokens."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.choice(VOCAB.image_size, VOCAB.image_tokens, replace=False) for _ in range(n)])
    captions = []
    for row in codes:
        planted = (PLANT + rng.choice(row, VOCAB.image_tokens // 2, replace=False)).tolist()
        noise = rng.integers(0, PLANT, 2).tolist()
        captions.append(planted + noise)
    return torch.from_numpy(codes), captions


def text_rows(seed: int = 0):
    return torch.randn(VOCAB.text_size, DIM, generator=torch.Generator().manual_seed(seed)) / math.sqrt(DIM)


@pytest.fixture(scope="module")
def trained():
    codes, captions = planted_pairs(2048)
    cfg = AlignConfig(batch_size=256, steps=150, lr=1e-2, log_every=10)
    return train_alignment(text_rows(), codes, captions, VOCAB.image_size, cfg)


def test_loss_decreases_and_planted_pairs_are_nearest(trained):
    first, last = np.mean(trained.losses[:5]), np.mean(trained.losses[-5:])
    print(f"loss {first:.3f} -> {last:.3f}, temperature {trained.temperature:.4f}")
    assert last < 0.5 * first
    codes = list(range(VOCAB.image_size))
    _, ids = nearest_text_tokens(trained.image_rows, text_rows(), codes, k=1)
    accuracy = (ids[:, 0] == PLANT + torch.tensor(codes)).float().mean().item()
    print(f"top-1 planted accuracy {accuracy:.3f}")
    assert accuracy >= 0.8


def test_untrained_rows_do_not_find_planted_pairs():
    rows = BagOfWordsAligner(text_rows(), VOCAB.image_size, seed=0).image_rows
    _, ids = nearest_text_tokens(rows, text_rows(), range(VOCAB.image_size), k=1)
    assert (ids[:, 0] == PLANT + torch.arange(VOCAB.image_size)).float().mean() < 0.2


def test_only_image_rows_and_temperature_train():
    text = text_rows()
    model = BagOfWordsAligner(text, VOCAB.image_size)
    assert [n for n, _ in model.named_parameters()] == ["image_rows", "logit_scale"]
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.image_rows.std().item() == pytest.approx(0.986 / math.sqrt(DIM), rel=0.1)  # open_lm init
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_()
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE) and model.temperature == pytest.approx(0.01)
    torch.testing.assert_close(model.text_rows, text, rtol=0, atol=0)


def test_clip_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = BagOfWordsAligner(text_rows(), VOCAB.image_size)
    codes, captions = planted_pairs(4)
    ids = torch.tensor([t for c in captions for t in c])
    offsets = torch.tensor([0, 10, 20, 30])  # every caption has 8 + 2 tokens
    loss, _ = model(codes, ids, offsets)
    img = torch.stack([model.image_rows[c].mean(0) for c in codes])
    txt = torch.stack([model.text_rows[c].mean(0) for c in captions])
    logits = (img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).T / 0.07
    expected = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_saved_rows_feed_extend_vocab(tmp_path, trained):
    path = save_aligned_rows(tmp_path / "aligned_rows.safetensors", trained.image_rows, {"steps": 150})
    rows = load_aligned_rows(path, VOCAB, DIM, seed=3)
    text_sd = {"tok_embeddings.weight": text_rows(), "output.weight": text_rows(1)}
    sd = extend_vocab(text_sd, VOCAB.size, rows=rows)
    for key in ("tok_embeddings.weight", "output.weight"):
        assert sd[key].shape == (VOCAB.size, DIM)
        torch.testing.assert_close(sd[key][: VOCAB.text_size], text_sd[key], rtol=0, atol=0)
        torch.testing.assert_close(sd[key][VOCAB.image_offset : VOCAB.special_offset], trained.image_rows, rtol=0, atol=0)
        specials = sd[key][VOCAB.special_offset :]
        assert specials.abs().max() <= 3 / math.sqrt(DIM) and specials.std() > 0  # open_lm init, not zeros
    assert not torch.equal(rows["tok_embeddings.weight"][-6:], rows["output.weight"][-6:])
    again = load_aligned_rows(path, VOCAB, DIM, seed=3)
    assert all(torch.equal(rows[k], again[k]) for k in rows)  # seeded specials
    with pytest.raises(ValueError, match="expected"):
        load_aligned_rows(path, tiny_vocab(image_size=32), DIM, seed=0)


def test_command_end_to_end(tmp_path, capsys):
    codes, captions = planted_pairs(64)
    samples = [ShardSample(f"k{i}", c.numpy(), np.array(t), "caption") for i, (c, t) in enumerate(zip(codes, captions))]
    samples.append(ShardSample("empty", codes[0].numpy(), np.array([], dtype=np.int32), ""))
    write_shard(tmp_path / "tokens" / "tokens-000000.tar", samples)
    save_open_lm({"tok_embeddings.weight": text_rows(), "output.weight": text_rows(1)}, tmp_path / "lm.pt")
    out = tmp_path / "align"
    argv = ["--shards", str(tmp_path / "tokens"), "--checkpoint", str(tmp_path / "lm.pt"), "--out", str(out),
            "--text_size", "300", "--real_text_size", "300", "--image_size", "64", "--batch_size", "32",
            "--steps", "20", "--log_every", "5", "--report_codes", "4", "--tokenizer", str(NEOX_BPE), "--device", "cpu"]
    rows_path = align_main(argv)
    assert load_file(str(rows_path))[ROWS_KEY].shape == (64, DIM)
    report = (out / "nearest_tokens.md").read_text()
    assert report.count("\n| ") == 4 + 1 and "(1 with an empty caption dropped)" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    assert {"align/loss", "align/temperature"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("align/loss")] == [5, 10, 15, 20]
