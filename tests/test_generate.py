"""The sampler: image-id masking, seeding, KV-cache decoding, batched classifier-free guidance, grids, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from t2i_ds import generate as gen_mod
from t2i_ds.sampling import cfg_prompt, generate_images, left_pad, sample_from_logits, save_grid
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
    """Stands in for the Transformer: records prompts; its logits favour every NON-image id.

    Speaks both loops' protocols: `forward_with_cache` (baseline) and `allocate_cache` + `forward_static` (fast).
    """

    def __init__(self, vocab):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.vocab, self.calls, self.masks, self.static = vocab, [], [], []

    def _logits(self, input_ids):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        logits = torch.rand(input_ids.shape[0], self.vocab.size, generator=g)  # (B, V)
        logits[:, : self.vocab.image_offset] += 100.0  # text ids: far more likely if not masked
        logits[:, self.vocab.special_offset :] += 100.0  # specials too
        return logits

    def forward_with_cache(self, input_ids, past=None, *, key_padding_mask=None):
        self.calls.append((input_ids.clone(), past is None))
        self.masks.append(None if key_padding_mask is None else key_padding_mask.clone())
        return self._logits(input_ids), (past or 0) + input_ids.shape[1]

    def allocate_cache(self, batch, max_len):
        return {"batch": batch, "max_len": max_len}

    def forward_static(self, input_ids, cache, index, *, positions, key_padding_mask=None, kv_len=None, rows=None):
        self.calls.append((input_ids.clone(), int(index[0]) == 0))
        self.masks.append(None if key_padding_mask is None else key_padding_mask.clone())
        self.static.append(dict(index=index.clone(), positions=positions.clone(), kv_len=kv_len, rows=rows, cache=cache))
        logits = self._logits(input_ids)
        return logits if rows is None else logits[:, rows[0] : rows[1]]


def greedy_full_recompute(model, vocab, caption):
    """Reference decoding without a cache: the full forward over the whole prefix at every step."""
    ids = torch.tensor([vocab.prompt(caption)])
    for _ in range(vocab.image_tokens):
        logits = model(ids)[:, -1, vocab.image_offset : vocab.special_offset]  # (1, I)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True) + vocab.image_offset], dim=1)
    return ids[0, -vocab.image_tokens :] - vocab.image_offset


@pytest.mark.parametrize("loop", ["fast", "baseline"])
def test_samples_only_image_ids(loop):
    fake = RecordingModel(VOCAB)
    codes = generate_images(fake, VOCAB, CAPTIONS, seed=0, temperature=2.0, loop=loop)
    assert codes.shape == (len(CAPTIONS), VOCAB.image_tokens) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < VOCAB.image_size
    assert len(codes.unique()) > VOCAB.image_size // 2  # sampled across the image range, not clamped to an edge
    steps = [ids for ids, first in fake.calls if not first]
    assert all(((s >= VOCAB.image_offset) & (s < VOCAB.special_offset)).all() for s in steps)  # fed back as image ids
    if loop == "fast":  # the head is asked for the image rows only, at every call
        assert {c["rows"] for c in fake.static} == {(VOCAB.image_offset, VOCAB.special_offset)}


@pytest.mark.parametrize("loop", ["fast", "baseline"])
def test_prompts_and_cfg_rows(loop):
    fake = RecordingModel(VOCAB)
    generate_images(fake, VOCAB, CAPTIONS[:2], cfg_scale=3.0, seed=0, loop=loop)
    P = VOCAB.pad_id
    uncond = [VOCAB.doc, VOCAB.text, VOCAB.text_end, VOCAB.image]  # the trained empty-caption prefix
    (prefill, first), *steps = fake.calls
    assert first and not any(f for _, f in steps)  # one prefill for both captions and their uncond rows
    # caption lengths 3 and 1: prompts of 7 and 5 ids, uncond 4; all left-padded to 7, [cond; uncond]
    assert prefill.tolist() == [VOCAB.prompt(CAPTIONS[0]), [P] * 2 + VOCAB.prompt(CAPTIONS[1]), [P] * 3 + uncond,
                                [P] * 3 + uncond]
    assert fake.masks[0].tolist() == [[True] * 7, [False] * 2 + [True] * 5, [False] * 3 + [True] * 4,
                                      [False] * 3 + [True] * 4]
    assert len(steps) == VOCAB.image_tokens - 1  # ONE forward per decoding step, not two
    for t, ((ids, _), mask) in enumerate(zip(steps, fake.masks[1:])):
        assert ids.shape == (4, 1) and torch.equal(ids[:2], ids[2:])  # the sampled code continues both halves
        assert mask.shape == (4, 7 + t + 1) and torch.equal(mask[:, :7], fake.masks[0]) and mask[:, 7:].all()
    if loop == "fast":
        pre, *decode = fake.static
        assert pre["index"].tolist() == list(range(7)) and pre["kv_len"] == 7
        assert pre["positions"].tolist()[1] == [0, 0, 0, 1, 2, 3, 4]  # left-padded row: real tokens from 0
        assert len({id(c["cache"]) for c in fake.static}) == 1  # one cache for the whole batch
        for t, call in enumerate(decode):  # the fed code goes to column 7 + t, at each row's next position
            assert call["index"].tolist() == [7 + t] and call["kv_len"] == 7 + t + 1
            assert call["positions"][:, 0].tolist() == [7 + t, 5 + t, 4 + t, 4 + t]


@pytest.mark.parametrize("loop", ["fast", "baseline"])
def test_no_mask_without_padding(loop):
    fake = RecordingModel(VOCAB)
    generate_images(fake, VOCAB, [[5, 6], [7, 8]], seed=0, loop=loop)  # cfg 0, one prompt length: the unpadded path
    assert all(m is None for m in fake.masks) and fake.calls[0][0].shape == (2, 6)
    ids, mask = left_pad([[3, 4, 5], [6]], pad_id=1, device="cpu")
    assert ids.tolist() == [[3, 4, 5], [1, 1, 6]] and mask.tolist() == [[True] * 3, [False, False, True]]


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


def two_call_cfg_reference(model, vocab, caption, cfg_scale):
    """The previous sampler, greedy: unpadded cond and uncond rows, two forwards and two KV caches per step."""
    logits_c, cache_c = model.forward_with_cache(torch.tensor([vocab.prompt(caption)]))  # (1, V)
    logits_u, cache_u = model.forward_with_cache(torch.tensor([cfg_prompt(vocab)]))  # (1, V)
    codes = []
    for _ in range(vocab.image_tokens):
        c, u = (x[:, vocab.image_offset : vocab.special_offset] for x in (logits_c, logits_u))  # (1, I)
        codes.append((u + cfg_scale * (c - u)).argmax(-1, keepdim=True))  # (1, 1)
        ids = codes[-1] + vocab.image_offset
        logits_c, cache_c = model.forward_with_cache(ids, cache_c)
        logits_u, cache_u = model.forward_with_cache(ids, cache_u)
    return torch.cat(codes, dim=1)[0]  # (image_tokens,)


@pytest.mark.parametrize("pos_embed", ["rotary", "none"])
def test_batched_cfg_equals_two_call_reference(pos_embed):
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=VOCAB.size, seq_len=VOCAB.seq_len, loss_impl="torch",
                        attn_backend="sdpa", pos_embed=pos_embed)
    m = build_model(args, VOCAB.modality_bounds).eval()
    batched = generate_images(m, VOCAB, CAPTIONS, top_k=1, cfg_scale=3.0)  # one mixed-length batch, 12 rows
    for caption, row in zip(CAPTIONS, batched):
        assert torch.equal(row, two_call_cfg_reference(m, VOCAB, caption, 3.0))


@pytest.mark.parametrize("cfg_scale", [0.0, 3.0])
def test_mixed_length_batch_equals_per_caption_calls(model, cfg_scale):
    alone = torch.cat([generate_images(model, VOCAB, [c], top_k=1, cfg_scale=cfg_scale) for c in CAPTIONS])
    for batch_size in (len(CAPTIONS), 4):  # one batch of lengths 3, 1, 3, 2, 0, 3; then 4 + 2 captions
        together = generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=cfg_scale, batch_size=batch_size)
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


# ----------------------------------------------------------------------------------------------------------------
# The fast loop: reproducible per caption, in-place cache, static shapes
# ----------------------------------------------------------------------------------------------------------------


def test_fast_loop_image_depends_only_on_caption_index_and_seed(model):
    kw = dict(cfg_scale=3.0, top_k=20, temperature=1.0, seed=5)
    together = generate_images(model, VOCAB, CAPTIONS, **kw)  # one batch of 6, indices 0..5
    assert len(together.unique()) > 20  # really sampled
    for i, caption in enumerate(CAPTIONS):  # each caption alone, keyed by its index: the same image
        assert torch.equal(generate_images(model, VOCAB, [caption], indices=[i], **kw)[0], together[i])
    order = [4, 1, 5, 0, 3, 2]  # other batches, other row order, other batch size
    shuffled = generate_images(model, VOCAB, [CAPTIONS[i] for i in order], indices=order, batch_size=4, **kw)
    assert torch.equal(shuffled, together[order])
    moved = generate_images(model, VOCAB, CAPTIONS, indices=[i + 100 for i in range(6)], **kw)  # other keys
    assert (moved != together).any(dim=1).all()


def test_fast_and_baseline_loops_agree_when_greedy(model):
    for cfg_scale in (0.0, 3.0):
        fast = generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=cfg_scale)
        assert torch.equal(fast, generate_images(model, VOCAB, CAPTIONS, top_k=1, cfg_scale=cfg_scale, loop="baseline"))


def test_cache_is_allocated_once_and_written_in_place(model, monkeypatch):
    seen = []
    original = type(model).forward_static

    def spy(self, ids, cache, index, **kw):
        seen.append((id(cache), cache.layers[0].k.data_ptr(), tuple(cache.layers[0].k.shape)))
        return original(self, ids, cache, index, **kw)

    monkeypatch.setattr(type(model), "forward_static", spy)
    generate_images(model, VOCAB, CAPTIONS[:2], cfg_scale=2.0, top_k=5)
    assert len(seen) == VOCAB.image_tokens and len(set(seen)) == 1  # prefill + every step: one cache, never moved
    L = len(VOCAB.prompt(CAPTIONS[0]))
    assert seen[0][2][::2] == (4, L + VOCAB.image_tokens - 1)  # (2b rows, H, prompt + fed-back codes, D)


@pytest.mark.parametrize("pos_embed", ["rotary", "head_rotary"])
def test_forward_static_matches_forward_with_cache(pos_embed):
    """Prefill and decode on the preallocated cache (sliced and whole-cache static) = the growing cache."""
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=VOCAB.size, seq_len=VOCAB.seq_len, loss_impl="torch", attn_backend="sdpa",
                        pos_embed=pos_embed)
    m = build_model(args, VOCAB.modality_bounds).eval()
    ids, mask = left_pad([VOCAB.prompt(c) for c in CAPTIONS[:3]], VOCAB.pad_id, "cpu")  # (3, 7)
    L, S, rows = ids.shape[1], ids.shape[1] + 3, (VOCAB.image_offset, VOCAB.special_offset)
    want, past = m.forward_with_cache(ids, key_padding_mask=mask)  # (3, V)
    from t2i_ds.model.transformer import padded_positions

    positions = padded_positions(mask)
    eager, static = m.allocate_cache(3, S), m.allocate_cache(3, S)
    got = m.forward_static(ids, eager, torch.arange(L), positions=positions, key_padding_mask=mask, kv_len=L, rows=rows)
    m.forward_static(ids, static, torch.arange(L), positions=positions, key_padding_mask=mask, kv_len=L, rows=rows)
    torch.testing.assert_close(got, want[:, rows[0] : rows[1]], rtol=1e-5, atol=1e-5)
    full = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)  # (3, S): unwritten columns off
    for t in range(3):
        new = torch.randint(VOCAB.image_offset, VOCAB.special_offset, (3, 1), generator=torch.Generator().manual_seed(t))
        grown = torch.cat([mask, torch.ones(3, t + 1, dtype=torch.bool)], dim=1)
        want, past = m.forward_with_cache(new, past, key_padding_mask=grown)
        pos, index = positions[:, -1:] + t + 1, torch.tensor([L + t])
        got = m.forward_static(new, eager, index, positions=pos, key_padding_mask=grown, kv_len=L + t + 1, rows=rows)
        full[:, L + t] = True
        whole = m.forward_static(new, static, index, positions=pos, key_padding_mask=full, kv_len=None, rows=rows)
        for out in (got, whole):
            torch.testing.assert_close(out, want[:, rows[0] : rows[1]], rtol=1e-5, atol=1e-5)
        # the cache holds what the growing cache holds: layer 0's keys bit for bit (the same ops on the same inputs);
        # deeper layers' within rounding, since the one-token CPU steps attend with `decode_attention`, not SDPA
        torch.testing.assert_close(eager.layers[0].k.transpose(1, 2)[:, : L + t + 1], past[0][0], rtol=0, atol=0)
        torch.testing.assert_close(eager.layers[1].k.transpose(1, 2)[:, : L + t + 1], past[1][0], rtol=1e-5, atol=1e-5)


def test_compiled_static_step_traces_once(model, monkeypatch):
    """compile=: one graph (fullgraph) for every step of every batch, no recompilation: static shapes, as CUDA
    graphs need (reduce-overhead on a GPU; dynamo alone here: the same graph capture, without a compiler)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    kw = dict(cfg_scale=3.0, top_k=20, seed=2)
    compiled = generate_images(model, VOCAB, CAPTIONS[:5], batch_size=2, compile={"backend": "eager", "fullgraph": True}, **kw)
    eager = generate_images(model, VOCAB, CAPTIONS[:5], batch_size=2, **kw)  # 3 batches, the last one filled up
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


@pytest.mark.requires_cuda
def test_cuda_graph_decode_equals_eager_and_cpu():
    """On a GPU: the reduce-overhead (CUDA graph) step gives the eager fast loop's codes, and the CPU's."""
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=VOCAB.size, seq_len=VOCAB.seq_len, loss_impl="torch", attn_backend="sdpa")
    cpu = build_model(args, VOCAB.modality_bounds).eval()
    gpu = build_model(args, VOCAB.modality_bounds, device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    kw = dict(cfg_scale=3.0, top_k=20, seed=4, batch_size=4)
    eager = generate_images(gpu, VOCAB, CAPTIONS, **kw)
    graphed = generate_images(gpu, VOCAB, CAPTIONS, compile=True, **kw)
    assert torch.equal(graphed, eager)
    assert (eager == generate_images(cpu, VOCAB, CAPTIONS, **kw)).float().mean() > 0.99  # rounding may flip a near-tie


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


class WordIds:
    """A text tokenizer for the CLI tests: one id per word (by its length)."""

    def encode_batch(self, texts):
        return [[5 + len(w) % 200 for w in t.split()] for t in texts]


@pytest.fixture
def fake_run(model, monkeypatch):
    from types import SimpleNamespace

    from t2i_ds.demo.tokenizer import PatchKMeansTokenizer
    from t2i_ds import inference

    torch.manual_seed(0)
    image_tok = PatchKMeansTokenizer(torch.rand(VOCAB.image_size, 3 * 4 * 4) * 2 - 1, patch=4, image_size=16)
    run = SimpleNamespace(model=model, vocab=VOCAB, text_tokenizer=WordIds(), image_tokenizer=image_tok)
    monkeypatch.setattr(inference, "load_run", lambda run_dir, **kw: run)  # kw: device
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    return run


def test_cli(fake_run, tmp_path, capsys):
    """A blank line is an empty caption at its own index, an over-long one is truncated as training does: one
    warning line each, naming the lines."""
    long = " ".join(["word"] * (VOCAB.max_caption_tokens + 5))
    (tmp_path / "captions.txt").write_text(f"a blue square\n\nthere is a red cross\n{long}\n\n")
    out = tmp_path / "grid.png"
    gen_mod.main(["--checkpoint", "run", "--captions", "top-left: red circle", "--captions_file",
                  str(tmp_path / "captions.txt"), "--out", str(out), "--cfg_scale", "2", "--top_k", "8"])
    assert Image.open(out).size[0] == 5 * (16 * 4 + 2)  # 1 + 4 captions (the trailing blank line is none)
    warnings = capsys.readouterr().err.splitlines()
    txt = tmp_path / "captions.txt"
    assert warnings == [
        f"t2i_ds.generate: warning: {txt} line 2 (caption index 2): blank, drawn as empty captions (unconditional images)",
        f"t2i_ds.generate: warning: {txt} line 4 (caption index 4) ({VOCAB.max_caption_tokens + 5} tokens): longer than "
        f"the {VOCAB.max_caption_tokens} caption tokens the sequence format holds, drawn from the first "
        f"{VOCAB.max_caption_tokens} (as training truncates them)"]


def test_caption_line_i_is_image_index_i(fake_run, tmp_path, capsys):
    """--out_dir from a .txt with a blank line and a U+2028 inside a caption: 000002.png is line 3's caption, the
    same bytes as when the captions are given one by one."""
    captions = ["a blue square", "", "there is a red cross", "two\u2028lines one caption", "last"]
    (tmp_path / "c.txt").write_text("a blue square\r\n\r\nthere is a red cross\ntwo\u2028lines one caption\n last \n\n")
    common = ["--checkpoint", "run", "--cfg_scale", "2", "--top_k", "8", "--seed", "3"]
    gen_mod.main([*common, "--captions_file", str(tmp_path / "c.txt"), "--out_dir", str(tmp_path / "from_file")])
    gen_mod.main([*common, "--captions", *captions, "--out_dir", str(tmp_path / "given")])
    made = sorted(p.name for p in (tmp_path / "from_file").glob("*.png"))
    assert made == [f"{i:06d}.png" for i in range(5)]
    assert all((tmp_path / "from_file" / n).read_bytes() == (tmp_path / "given" / n).read_bytes() for n in made)


def test_a_jsonl_with_bad_lines_is_refused_naming_each_line(fake_run, tmp_path, capsys):
    from t2i_ds.cli import run
    from t2i_ds.eval.generation import read_caption_file

    rows = [json.dumps({"caption": c}) for c in ("", "x" * 5000, "\U0001F308\U0001F308")]  # all fine
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(rows) + "\n\n")
    assert read_caption_file(good) == ["", "x" * 5000, "\U0001F308\U0001F308"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([rows[0], rows[1], '{"caption": "a red circle", oops}', '{"url": "x"}', "", rows[2]]))
    with pytest.raises(SystemExit) as exit_:
        run("t2i_ds.generate", lambda: gen_mod.main(["--checkpoint", "run", "--captions_file", str(bad),
                                                     "--out_dir", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"t2i_ds.generate: error: {bad}: line 3 is not JSON (Expecting property name enclosed in double quotes at "
        "column 29); line 4 has no string 'caption' (or 'text') field; line 5 is blank (write {\"caption\": \"\"} for "
        "an empty caption): fix these lines (line i is caption index i - 1, so removing one moves every later caption); "
        "nothing was drawn\n")
    assert not (tmp_path / "out").exists()
