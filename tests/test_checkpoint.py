"""open_lm checkpoint I/O: exact key names, strict loading, vocabulary extension, round trips."""

import pytest
import torch

from t2i_ds.model import build_model, model_preset
from t2i_ds.model.checkpoint import CheckpointMismatch, extend_vocab, load_into, read_state_dict, save_open_lm
from t2i_ds.vocab import tiny_vocab


def open_lm_state_dict(dim, n_layers, hidden, vocab, inv_freq=True, bias=True, seed=0):
    """A state dict written from open_lm's key list (reference/open_lm_1b.md section 3.2), not from our model."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {"tok_embeddings.weight": r(vocab, dim), "output.weight": r(vocab, dim), "norm.weight": 1 + r(dim)}
    if bias:
        sd["norm.bias"] = r(dim)
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.in_proj.weight"] = r(3 * dim, dim)
        sd[p + "attention.out_proj.weight"] = r(dim, dim)
        if inv_freq:
            hd = dim // 4
            sd[p + "attention.pos_embed.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        sd[p + "feed_forward.w12.weight"] = r(2 * hidden, dim)
        sd[p + "feed_forward.w3.weight"] = r(dim, hidden)
        for n in ("attention_norm", "ffn_norm"):
            sd[p + n + ".weight"] = 1 + r(dim)
            if bias:
                sd[p + n + ".bias"] = r(dim)
    return sd


ARGS = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, loss_impl="torch")


def test_open_lm_keys_load_strictly(tmp_path):
    sd = open_lm_state_dict(64, 2, 256, 300)
    for wrap, name in ((lambda d: {"state_dict": d, "epoch": 3, "name": "x"}, "a.pt"), (lambda d: d, "b.pt")):
        torch.save(wrap({"module." + k: v for k, v in sd.items()}), tmp_path / name)
        m = build_model(model_preset("debug", pos_embed="head_rotary", **ARGS))
        load_into(m, read_state_dict(tmp_path / name))
        assert torch.equal(m.layers[1].feed_forward.w12.weight, sd["layers.1.feed_forward.w12.weight"])
    # a NoPE model tolerates the inv_freq buffers; a rotary model tolerates their absence
    load_into(build_model(model_preset("debug", pos_embed="none", **ARGS)), sd)
    load_into(build_model(model_preset("debug", **ARGS)), {k: v for k, v in sd.items() if "inv_freq" not in k})
    # torch.compile's prefix
    load_into(build_model(model_preset("debug", **ARGS)), {"_orig_mod." + k: v for k, v in sd.items()})


def test_mismatch_lists_every_problem():
    sd = open_lm_state_dict(64, 2, 256, 300)
    sd.pop("layers.0.ffn_norm.bias")
    sd["layers.0.attention.extra.weight"] = torch.zeros(1)
    sd["output.weight"] = torch.zeros(299, 64)
    with pytest.raises(CheckpointMismatch) as e:
        load_into(build_model(model_preset("debug", **ARGS)), sd)
    msg = str(e.value)
    assert "missing: layers.0.ffn_norm.bias" in msg
    assert "unexpected: layers.0.attention.extra.weight" in msg
    assert "shape: output.weight: checkpoint (299, 64) vs model (300, 64)" in msg
    with pytest.raises(CheckpointMismatch, match="missing: norm.bias"):  # gain-only checkpoint into a LayerNorm model
        load_into(build_model(model_preset("debug", **ARGS)), open_lm_state_dict(64, 2, 256, 300, bias=False))


@pytest.mark.parametrize("init", ["random", "mean"])
def test_extension_keeps_text_logits(init):
    v = tiny_vocab()
    torch.manual_seed(0)
    base = build_model(model_preset("debug", **ARGS)).eval()
    sd = extend_vocab(base.state_dict(), v.size, init=init, seed=1)
    big = build_model(model_preset("debug", **{**ARGS, "vocab_size": v.size}), v.modality_bounds).eval()
    load_into(big, sd)
    assert torch.equal(big.tok_embeddings.weight[:300], base.tok_embeddings.weight)  # rows copied exactly
    ids = torch.randint(0, 300, (2, 17))
    torch.testing.assert_close(big(ids)[..., :300], base(ids), rtol=0, atol=0)
    new = big.output.weight[300:]
    if init == "mean":
        torch.testing.assert_close(new, base.output.weight.mean(0, keepdim=True).expand_as(new))
    else:
        assert 0.5 < new.std().item() * 8 < 1.5  # std 1/sqrt(64)
        assert torch.equal(new, extend_vocab(base.state_dict(), v.size, init=init, seed=1)["output.weight"][300:])


def test_extension_with_given_rows_and_bad_shape():
    base = build_model(model_preset("debug", **ARGS)).state_dict()
    rows = {"tok_embeddings.weight": torch.ones(70, 64)}
    sd = extend_vocab(base, 370, rows=rows)
    assert torch.equal(sd["tok_embeddings.weight"][300:], torch.ones(70, 64))
    with pytest.raises(CheckpointMismatch, match="expected"):
        extend_vocab(base, 371, rows=rows)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip_is_bit_exact(tmp_path, suffix):
    torch.manual_seed(0)
    m = build_model(model_preset("debug", **ARGS))
    save_open_lm(m, tmp_path / f"ckpt{suffix}")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind
    m2 = build_model(model_preset("debug", **ARGS))
    load_into(m2, read_state_dict(tmp_path / f"ckpt{suffix}"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatch, match="list.pt"):
        read_state_dict(tmp_path / "list.pt")
