"""The sampler: image-id masking, seeding, KV-cache decoding, classifier-free guidance, grids, CLI."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from t2i_ds import generate as gen_mod
from t2i_ds.generate import cfg_prompt, generate_images, sample_from_logits, save_grid
from t2i_ds.model.args import model_preset
from t2i_ds.model.transformer import build_model
from t2i_ds.vocab import tiny_vocab

VOCAB = tiny_vocab()  # 300 text ids, 64 codes, 16 tokens per image
CAPTIONS = [[5, 6, 7], [8], [9, 10, 11], [12, 13], [], [14, 15, 16]]  # lengths 3, 1, 3, 2, 0, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=VOCAB.size, seq_len=VOCAB.seq_len, loss_impl="torch", attn_backend="sdpa")
    return build_model(args, VOCAB.modality_bounds).eval()


class RecordingModel(nn.Module):
    """Stands in for the Transformer: records prompts; its logits favour every NON-image id."""

    def __init__(self, vocab):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.vocab, self.calls = vocab, []

    def forward_with_cache(self, input_ids, past=None):
        self.calls.append((input_ids.clone(), past is None))
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        logits = torch.rand(input_ids.shape[0], self.vocab.size, generator=g)  # (B, V)
        logits[:, : self.vocab.image_offset] += 100.0  # text ids: far more likely if not masked
        logits[:, self.vocab.special_offset :] += 100.0  # specials too
        return logits, (past or 0) + input_ids.shape[1]


def greedy_full_recompute(model, vocab, caption):
    """Reference decoding without a cache: the full forward over the whole prefix at every step."""
    ids = torch.tensor([vocab.prompt(caption)])
    for _ in range(vocab.image_tokens):
        logits = model(ids)[:, -1, vocab.image_offset : vocab.special_offset]  # (1, I)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True) + vocab.image_offset], dim=1)
    return ids[0, -vocab.image_tokens :] - vocab.image_offset


def test_samples_only_image_ids():
    fake = RecordingModel(VOCAB)
    codes = generate_images(fake, VOCAB, CAPTIONS, seed=0, temperature=2.0)
    assert codes.shape == (len(CAPTIONS), VOCAB.image_tokens) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < VOCAB.image_size
    assert len(codes.unique()) > VOCAB.image_size // 2  # sampled across the image range, not clamped to an edge
    steps = [ids for ids, first in fake.calls if not first]
    assert all(((s >= VOCAB.image_offset) & (s < VOCAB.special_offset)).all() for s in steps)  # fed back as image ids


def test_prompts_and_cfg_rows():
    fake = RecordingModel(VOCAB)
    generate_images(fake, VOCAB, CAPTIONS[:2], cfg_scale=3.0, seed=0)
    prefills = [ids.tolist() for ids, first in fake.calls if first]
    uncond = [VOCAB.doc, VOCAB.text, VOCAB.text_end, VOCAB.image]  # the trained empty-caption prefix
    expected = [[VOCAB.prompt(CAPTIONS[1])], [uncond], [VOCAB.prompt(CAPTIONS[0])], [uncond]]
    assert prefills == expected  # grouped by length (shortest first), each with its unconditional rows
    decode_calls = sum(1 for _, first in fake.calls if not first)
    assert decode_calls == 2 * 2 * (VOCAB.image_tokens - 1)  # two groups x (cond + uncond) x steps after the first


def test_unconditional_prompt_is_the_trained_empty_caption_prefix():
    codes = np.arange(VOCAB.image_tokens) % VOCAB.image_size
    trained = VOCAB.text_to_image([], codes).input_ids  # a caption-dropout training sample
    p = cfg_prompt(VOCAB)
    assert p == trained[: len(p)].tolist() == [VOCAB.doc, VOCAB.text, VOCAB.text_end, VOCAB.image]
    assert trained[len(p)] == VOCAB.image_offset + codes[0]  # the image codes follow right after it


def test_seeded_and_deterministic(model):
    a = generate_images(model, VOCAB, CAPTIONS, seed=1, top_k=20)
    b = generate_images(model, VOCAB, CAPTIONS, seed=1, top_k=20)
    c = generate_images(model, VOCAB, CAPTIONS, seed=2, top_k=20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < VOCAB.image_size


def test_kv_cache_decoding_equals_full_recompute(model):
    codes = generate_images(model, VOCAB, CAPTIONS, top_k=1)
    for caption, row in zip(CAPTIONS, codes):
        assert torch.equal(row, greedy_full_recompute(model, VOCAB, caption))


def test_batching_keeps_input_order(model):
    together = generate_images(model, VOCAB, CAPTIONS, top_k=1, batch_size=2)
    alone = torch.cat([generate_images(model, VOCAB, [c], top_k=1) for c in CAPTIONS])
    assert torch.equal(together, alone)


def test_cfg(model):
    plain = generate_images(model, VOCAB, CAPTIONS, top_k=1)
    assert torch.equal(generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=0.0), plain)
    assert torch.equal(generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=1.0), plain)  # u + 1 (c - u) = c
    guided = generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=5.0)
    assert not torch.equal(guided, plain)
    assert torch.equal(generate_images(model, VOCAB, [[]], top_k=1, cfg_scale=5.0), plain[4:5])  # c == u
    sampled = generate_images(model, VOCAB, CAPTIONS, cfg_scale=3.0, seed=0)
    assert torch.equal(sampled, generate_images(model, VOCAB, CAPTIONS, cfg_scale=3.0, seed=0))


def test_sample_from_logits_top_k_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(2000, 1)
    assert sample_from_logits(logits, 1, 1.0, g).eq(1).all()
    top2 = sample_from_logits(logits, 2, 1.0, g)
    assert set(top2.tolist()) == {1, 2}
    cold = sample_from_logits(logits, None, 0.05, g)
    assert cold.eq(1).float().mean() > 0.99
    with pytest.raises(ValueError, match="temperature"):
        generate_images(RecordingModel(VOCAB), VOCAB, [[5]], temperature=0.0)


def test_save_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    save_grid(images, tmp_path / "grid.png", nrow=3, scale=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 18, 3 * 18, 3)
    assert np.array_equal(grid[:16:2, 18:34:2], images[1])  # tile 1, upscaled by 2 with nearest
    save_grid(images, tmp_path / "captioned.png", nrow=3, captions=["a red circle at the top left"] * 5)
    assert Image.open(tmp_path / "captioned.png").size[1] > 2 * (8 * 4 + 2)


def test_cli(model, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from t2i_ds.data.demo_tokenizer import PatchKMeansTokenizer
    from t2i_ds import export

    class WordIds:
        def encode_batch(self, texts):
            return [[5 + len(w) for w in t.split()] for t in texts]

    image_tok = PatchKMeansTokenizer(torch.rand(VOCAB.image_size, 3 * 4 * 4) * 2 - 1, patch=4, image_size=16)
    run = SimpleNamespace(model=model, vocab=VOCAB, text_tokenizer=WordIds(), image_tokenizer=image_tok)
    monkeypatch.setattr(export, "load_run", lambda run_dir: run)
    (tmp_path / "captions.txt").write_text("a blue square\n\nthere is a red cross\n")
    out = tmp_path / "grid.png"
    gen_mod.main(["--checkpoint", "run", "--captions", "top-left: red circle", "--captions_file",
                  str(tmp_path / "captions.txt"), "--out", str(out), "--cfg_scale", "2", "--top_k", "8"])
    assert Image.open(out).size[0] == 3 * (16 * 4 + 2)
