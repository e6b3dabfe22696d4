"""The demo's palette + binary-mask image tokenizer (t2i_ds.demo.mask_tokenizer): exact encode -> decode of flat images."""

import numpy as np
import pytest
import torch

from t2i_ds.data.image_tokenizers import load_image_tokenizer
from t2i_ds.data.images import to_uint8
from t2i_ds.data.tokenizers import ImageTokenizer
from t2i_ds.demo import shapes
from t2i_ds.demo.mask_tokenizer import PaletteMaskTokenizer
from t2i_ds.demo.tokenizer import patchify, to_tensor

N_BG, N_FG, MASKS, PATCH = len(shapes.BACKGROUNDS), len(shapes.COLORS), 128, 4
P = N_BG * N_FG  # palette codes


@pytest.fixture(scope="module")
def tokenizer():
    images = np.stack([s.image for s in shapes.generate(500, seed=0)])
    return PaletteMaskTokenizer.fit(to_tensor(images), N_BG, N_FG, MASKS, PATCH)


@pytest.fixture(scope="module")
def held_out():
    return shapes.generate(100, seed=1)


def test_protocol_sizes_and_palette(tokenizer):
    assert isinstance(tokenizer, ImageTokenizer)
    assert tokenizer.codebook_size == P + MASKS and tokenizer.grid == (8, 8) and tokenizer.tokens_per_image == 65
    as_uint8 = lambda c: {tuple(int(v) for v in x) for x in ((c + 1) * 127.5).round()}  # noqa: E731
    assert as_uint8(tokenizer.backgrounds) == set(shapes.BACKGROUNDS.values())  # the palette is the data's
    assert as_uint8(tokenizer.foregrounds) == set(shapes.COLORS.values())
    assert tokenizer.masks[0].sum() == 0 and tokenizer.masks[1].sum() == PATCH * PATCH  # empty and full first


def test_encode_decode_is_exact_for_flat_images(tokenizer, held_out):
    images = np.stack([s.image for s in held_out])  # (N, 32, 32, 3) uint8
    codes = tokenizer.encode(to_tensor(images))
    assert codes.shape == (len(held_out), 65) and codes.dtype == torch.int64
    assert (codes[:, 0] < P).all() and (codes[:, 1:] >= P).all() and codes.max() < tokenizer.codebook_size
    recon = to_uint8(tokenizer.decode(codes))  # (N, 32, 32, 3)
    exact = (recon == images).all(axis=(1, 2, 3))
    wrong = (recon != images).any(-1).sum(axis=(1, 2))  # pixels off per image
    print("exact", exact.mean(), "pixels off: max", wrong.max(), "mean", wrong.mean())
    assert exact.mean() >= 0.3 and wrong.max() <= 12  # a mask outside 128 rows costs its nearest row's few pixels
    found = [shapes.classify(im) for im in recon]
    assert np.mean([f == s.attributes for f, s in zip(found, held_out)]) >= 0.97  # all four attributes survive
    assert torch.equal(tokenizer.encode(to_tensor(images)), codes)  # deterministic


def test_a_mask_in_the_codebook_comes_back_bit_for_bit(tokenizer):
    """Hand-built image: gray background, red pixels exactly in codebook masks 0, 1, 2, ... -> the same codes back."""
    rows = torch.arange(64) % MASKS  # patch t holds mask row t
    bits = tokenizer.masks[rows].float()  # (64, 16)
    fg = torch.tensor(shapes.COLORS["red"]) / 127.5 - 1
    bg = torch.tensor(shapes.BACKGROUNDS["gray"]) / 127.5 - 1
    patches = bg[:, None] + bits[:, None, :] * (fg - bg)[:, None]  # (64, 3, 16)
    image = torch.nn.functional.fold(patches.reshape(64, 48).T[None], (32, 32), PATCH, stride=PATCH)  # (1, 3, 32, 32)
    assert torch.equal(patchify(image, PATCH)[0].view(64, 3, 16), patches)
    codes = tokenizer.encode(image)
    assert torch.equal(codes[0, 1:], rows + P)
    assert torch.allclose(tokenizer.decode(codes), image, atol=1e-6)


def test_decode_of_misplaced_codes_and_bad_codes(tokenizer):
    codes = torch.full((1, 65), P + 1)  # every patch full: the whole image in the foreground colour
    codes[0, 0] = P + 5  # a mask code where the palette goes: pair 0
    codes[0, 1] = 3  # a palette code where a mask goes: the empty mask
    image = tokenizer.decode(codes)[0]  # (3, 32, 32)
    assert torch.equal(image[:, 4, 4], tokenizer.foregrounds[0]) and torch.equal(image[:, 0, 0], tokenizer.backgrounds[0])
    for bad in (torch.full((1, 65), tokenizer.codebook_size), torch.zeros(1, 64, dtype=torch.long)):
        with pytest.raises(ValueError):
            tokenizer.decode(bad)


def test_save_load_through_the_registry(tokenizer, held_out, tmp_path):
    import t2i_ds.demo  # noqa: F401  (registers "demo_mask")

    tokenizer.save(tmp_path / "tok")
    loaded = load_image_tokenizer(f"demo_mask:{tmp_path / 'tok'}")
    assert isinstance(loaded, PaletteMaskTokenizer) and torch.equal(loaded.masks, tokenizer.masks)
    x = to_tensor(np.stack([s.image for s in held_out[:20]]))
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    assert not list((tmp_path / "tok").glob("*.tmp"))


def test_fit_pads_rows_it_cannot_fill():
    images = to_tensor(np.stack([s.image for s in shapes.generate(3, seed=0)]))
    tok = PaletteMaskTokenizer.fit(images, N_BG, N_FG, 1000, PATCH)  # 3 images: fewer colours and masks than rows
    assert tok.codebook_size == P + 1000 and len(tok.backgrounds) == N_BG
    recon = to_uint8(tok.decode(tok.encode(images)))
    assert np.array_equal(recon, to_uint8(images))  # still exact: the padding is never picked


def test_the_demo_data_set_uses_it_by_default(tmp_path):
    from t2i_ds.data.shards import list_shards, read_shard
    from t2i_ds.demo.data import DemoSizes, image_tokenizer_spec, load_demo_vocab, make_demo_dataset

    make_demo_dataset(tmp_path, n_train=200, n_val=20, seed=0)
    vocab, sizes = load_demo_vocab(tmp_path), DemoSizes()
    assert (vocab.image_size, vocab.image_tokens) == (sizes.image_codes, sizes.tokens_per_image) == (P + MASKS, 65)
    assert image_tokenizer_spec(tmp_path) == f"demo_mask:{tmp_path / 'image_tokenizer'}"
    s = read_shard(list_shards(tmp_path / "train")[0])[0]
    assert s.codes.shape == (65,) and s.codes[0] < P <= s.codes[1:].min() and s.codes.max() < P + MASKS
