"""The open_lm model: sizes, init, rotary variants, causality, loss split."""

import math

import pytest
import torch

from t2i_ds.model import build_model, count_parameters, model_preset
from t2i_ds.model.layers import RotaryEmbedding
from t2i_ds.vocab import IGNORE, Vocab, tiny_vocab


def test_open_lm_1b_parameter_counts_on_meta():
    args = model_preset("open_lm_1b")
    assert args.ffn_hidden == 5632 and args.head_dim == 128 and args.pos_embed == "head_rotary"
    model = build_model(args, device="meta")
    assert count_parameters(model) == 1_439_895_552
    extended = build_model(args.replace(vocab_size=Vocab().size), device="meta")
    assert count_parameters(extended) == 1_507_028_992


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="open_lm_1b"):
        model_preset("open_lm_2b")


def test_open_lm_init_statistics():
    args = model_preset("debug", dim=256, n_layers=4, n_heads=4)
    torch.manual_seed(0)
    m = build_model(args)
    std = 1 / math.sqrt(256)
    assert abs(m.tok_embeddings.weight.std().item() - std * 0.986) < 0.05 * std  # trunc at 3 std
    for i, layer in enumerate(m.layers):
        w = layer.attention.out_proj.weight
        assert w.abs().max() <= 3 * std / math.sqrt(2 * (i + 1)) + 1e-6  # depth-scaled bound
    assert m.layers[0].attention_norm.bias is not None and (m.norm.weight == 1).all()


def _qk_scores(q, k):
    return torch.einsum("bshd,bthd->bhst", q, k)


def test_head_rotary_leaves_attention_scores_unchanged():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 4, 16, dtype=torch.float64), torch.randn(2, 9, 4, 16, dtype=torch.float64)
    rot = RotaryEmbedding(16, 10_000.0, by_head=True).double()
    qr, kr = rot(q, k)
    assert not torch.allclose(qr, q)  # it does rotate ...
    torch.testing.assert_close(_qk_scores(qr, kr), _qk_scores(q, k), rtol=0, atol=1e-5)  # ... scores stay (fp32 angles)


def test_head_rotary_model_equals_nope_model():
    torch.manual_seed(0)
    a = build_model(model_preset("debug", pos_embed="head_rotary", loss_impl="torch"))
    b = build_model(model_preset("debug", pos_embed="none", loss_impl="torch"))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.endswith("inv_freq")})
    ids = torch.randint(0, 370, (2, 24))
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)


def test_rotary_matches_closed_form():
    D, S = 8, 5
    rot = RotaryEmbedding(D, 10_000.0, by_head=False).double()
    x = torch.randn(1, S, 1, D, dtype=torch.float64)
    out, _ = rot(x, x, offset=3)
    for m in range(S):
        pos = m + 3
        for i in range(D // 2):
            theta = pos * 10_000.0 ** (-2 * i / D)
            a, b = x[0, m, 0, i], x[0, m, 0, i + D // 2]
            assert torch.isclose(out[0, m, 0, i], a * math.cos(theta) - b * math.sin(theta), atol=1e-6)
            assert torch.isclose(out[0, m, 0, i + D // 2], b * math.cos(theta) + a * math.sin(theta), atol=1e-6)
    # relative: the score of (q at m, k at n) depends on m - n only
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)
    s1 = (rot(q, q, offset=7)[0] * rot(k, k, offset=4)[1]).sum()
    s2 = (rot(q, q, offset=13)[0] * rot(k, k, offset=10)[1]).sum()
    assert torch.isclose(s1, s2, atol=1e-6)


@pytest.mark.parametrize("pos_embed", ["rotary", "head_rotary"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_causality(pos_embed, qk_norm):
    torch.manual_seed(0)
    m = build_model(model_preset("debug", pos_embed=pos_embed, qk_norm=qk_norm, loss_impl="torch")).eval()
    ids = torch.randint(0, 370, (2, 20))
    ids2 = ids.clone()
    ids2[:, 12:] = torch.randint(0, 370, (2, 8))
    a, b = m(ids), m(ids2)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = build_model(model_preset("debug", loss_impl="torch")).eval()
    ids = torch.randint(0, 370, (2, 12))
    full = m(ids)
    logits, cache = m.forward_with_cache(ids[:, :8])
    torch.testing.assert_close(logits, full[:, 7], rtol=1e-5, atol=1e-5)
    for t in range(8, 12):
        logits, cache = m.forward_with_cache(ids[:, t : t + 1], cache)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_weight_tying_shares_the_parameter():
    m = build_model(model_preset("debug", weight_tying=True))
    assert m.tok_embeddings.weight is m.output.weight
    assert count_parameters(m) == count_parameters(build_model(model_preset("debug"))) - 370 * 64


def test_modality_sums_add_up_and_pad_contributes_nothing():
    v = tiny_vocab()
    torch.manual_seed(0)
    m = build_model(model_preset("debug", vocab_size=v.size, loss_impl="torch"), v.modality_bounds)
    sample = v.build([5, 6, 7], torch.randint(0, v.image_size, (v.image_tokens,)).numpy())
    ids = torch.from_numpy(sample.input_ids)[None].repeat(2, 1)
    tgt = torch.from_numpy(sample.targets)[None].repeat(2, 1)
    out = m(ids, tgt)
    n_real = int((tgt != IGNORE).sum())
    assert out.count.item() == n_real
    assert out.modality_counts.tolist() == [2 * 3, 2 * 16, 2 * 5]  # caption, image codes, 5 specials (<doc> is never a target)
    torch.testing.assert_close(out.modality_sums.sum(), out.loss_sum.detach(), rtol=1e-6, atol=1e-5)
    logits = m(ids).float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-4)
    # what sits in input positions whose target is ignored (</doc>, pads) changes no loss
    ids2 = ids.clone()
    ids2[tgt == IGNORE] = 7
    out2 = m(ids2, tgt)
    torch.testing.assert_close(out2.loss_sum, out.loss_sum, rtol=1e-6, atol=1e-6)
    ids2[:, 5] = 9  # ... while changing a real input does
    assert not torch.allclose(m(ids2, tgt).loss_sum, out.loss_sum)


def test_same_logits_with_every_attention_backend():
    """Every backend available here (sdpa variants, our Triton kernel under the interpreter, eager)
    gives the model's logits of eager attention. All run in fp32, so they differ only in the order
    of sums (~1e-6 relative); 1e-4 absolute on logits of magnitude ~1 catches any real error."""
    from t2i_ds.model.attention import available_backends

    torch.manual_seed(0)
    model = build_model(model_preset("debug", attn_backend="eager", loss_impl="torch")).eval()
    ids = torch.randint(0, 370, (2, 19))  # 19: not a multiple of any block size
    ref = model(ids)
    backends = available_backends("cpu")
    assert "triton" in backends and "sdpa" in backends
    for backend in backends:
        for layer in model.layers:
            layer.attention.backend = backend
        err = (model(ids) - ref).abs().max().item()
        print(backend, err)
        assert err <= 1e-4, backend
