"""The demo's patch k-means image tokenizer, its word-level text tokenizer and the demo data set on disk."""

import json

import numpy as np
import pytest
import torch

from t2i_ds.demo import shapes
from t2i_ds.demo.data import DemoSizes, build_text_tokenizer, load_demo_vocab, make_demo_dataset, read_val_captions
from t2i_ds.data.images import to_uint8
from t2i_ds.demo.tokenizer import PatchKMeansTokenizer, patchify, to_tensor, unpatchify
from t2i_ds.data.tokenizers import ImageTokenizer
from t2i_ds.data.shards import list_shards, read_manifest, read_shard

CODEBOOK, PATCH = 256, 4


@pytest.fixture(scope="module")
def tokenizer():
    images = np.stack([s.image for s in shapes.generate(1500, seed=0)])
    return PatchKMeansTokenizer.fit(to_tensor(images), CODEBOOK, PATCH, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return shapes.generate(300, seed=1)


def test_protocol_and_sizes(tokenizer):
    assert isinstance(tokenizer, ImageTokenizer)
    assert tokenizer.codebook_size == CODEBOOK and tokenizer.grid == (8, 8) and tokenizer.image_size == 32
    assert tokenizer.tokens_per_image == 64


def test_patchify_round_trip_and_raster_order():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)  # (2, 2 * 3, 48)
    assert p.shape == (2, 6, 48)
    assert torch.equal(p[1, 4], x[1, :, 4:8, 4:8].reshape(-1))  # patch (row 1, col 1) is the 5th
    assert torch.equal(unpatchify(p, 4, (2, 3)), x)


def test_uint8_conversions_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    t = to_tensor(images)
    assert t.shape == (3, 3, 8, 8) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(to_uint8(t), images)


def test_codes_in_range_and_deterministic(tokenizer, held_out):
    x = to_tensor(np.stack([s.image for s in held_out]))
    codes = tokenizer.encode(x)
    assert codes.shape == (len(held_out), 64) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < CODEBOOK
    assert len(codes.unique()) > CODEBOOK // 2  # the codebook is in use, not collapsed
    assert torch.equal(codes, tokenizer.encode(x))
    images = np.stack([s.image for s in shapes.generate(1500, seed=0)])
    refit = PatchKMeansTokenizer.fit(to_tensor(images), CODEBOOK, PATCH, seed=0)
    assert torch.equal(refit.codebook, tokenizer.codebook)  # fit is a function of (data, sizes, seed)


def test_reconstruction_keeps_the_attributes(tokenizer, held_out):
    x = to_tensor(np.stack([s.image for s in held_out]))
    recon = tokenizer.decode(tokenizer.encode(x))
    assert recon.shape == x.shape and recon.min() >= -1 and recon.max() <= 1
    found = [shapes.classify(im) for im in to_uint8(recon)]
    acc = {f: np.mean([getattr(p, f) == getattr(s.attributes, f) for p, s in zip(found, held_out)])
           for f in ("color", "row", "col", "background", "shape")}
    print(acc, "mse", ((recon - x) ** 2).mean().item())
    assert acc["color"] >= 0.95 and acc["row"] >= 0.95 and acc["col"] >= 0.95 and acc["background"] >= 0.95
    assert ((recon - x) ** 2).mean() < 0.02


def test_decode_is_the_codebook(tokenizer):
    codes = torch.arange(64).view(1, 64)  # code i at patch i
    patches = patchify(tokenizer.decode(codes), PATCH)[0]  # (64, 48)
    assert torch.allclose(patches, tokenizer.codebook[:64].clamp(-1, 1))
    with pytest.raises(ValueError):
        tokenizer.decode(torch.full((1, 64), CODEBOOK))


def test_save_load_round_trip(tokenizer, held_out, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = PatchKMeansTokenizer.load(tmp_path / "tok")
    assert torch.equal(loaded.codebook, tokenizer.codebook)
    assert (loaded.patch, loaded.image_size, loaded.grid) == (tokenizer.patch, tokenizer.image_size, tokenizer.grid)
    x = to_tensor(np.stack([s.image for s in held_out[:20]]))
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    assert not list((tmp_path / "tok").glob("*.tmp"))


def test_text_tokenizer_covers_every_caption(tmp_path):
    tok = build_text_tokenizer()
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[UNK]") == 1
    assert tok.encode("top-left: red circle").tokens == ["top", "-", "left", ":", "red", "circle"]
    unk = tok.token_to_id("[UNK]")
    for s in shapes.generate(200, seed=2):
        ids = tok.encode(s.caption).ids
        assert unk not in ids and tok.decode(ids).replace(" ", "") == s.caption.replace(" ", "")
    tok.save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("a blue square").ids == tok.encode("a blue square").ids


def test_make_demo_dataset(tmp_path):
    summary = make_demo_dataset(tmp_path, n_train=300, n_val=40, seed=0, sizes=DemoSizes(tokenizer="patch_kmeans", codebook_size=32))
    vocab = load_demo_vocab(tmp_path)
    assert summary["vocab"] == json.loads((tmp_path / "demo_vocab.json").read_text())
    assert (vocab.image_size, vocab.image_tokens, vocab.text_size, vocab.pad_id) == (32, 64, 64, 0)
    assert vocab.seq_len <= 96 and vocab.real_text_size == len(shapes.words()) + 2
    samples = [s for p in list_shards(tmp_path / "train") for s in read_shard(p)]
    assert len(samples) == 300 and read_manifest(tmp_path / "train")["stats"]["samples"] == 300
    s = samples[0]
    assert s.codes.dtype == np.uint16 and s.codes.shape == (64,) and s.codes.max() < 32
    assert s.caption_ids.dtype == np.int32 and len(s.caption_ids) <= vocab.max_caption_tokens
    assert vocab.text_to_image(s.caption_ids, s.codes).input_ids.shape == (vocab.seq_len,)
    ids, attrs = read_val_captions(tmp_path)
    assert len(ids) == len(attrs) == 40
    val = shapes.generate(40, seed=1)
    assert attrs == [v.attributes for v in val]
    assert ids[0] == build_text_tokenizer().encode(val[0].caption).ids
    assert len(list_shards(tmp_path / "val")) == 1
