"""Key-padding masks and per-row positions: a left-padded row computes exactly what the unpadded row does."""

import pytest
import torch

from t2i_ds.model import build_model, model_preset
from t2i_ds.model.attention import attention, available_backends, padded_causal_mask
from t2i_ds.model.layers import RotaryEmbedding
from t2i_ds.model.transformer import padded_positions

V = 370  # the debug preset's vocabulary
ATOL = 1e-5  # fp32; the padded and the unpadded row run different reductions only through the masked softmax


def _padded_batch(lengths, pad_id=1, seed=0):
    """Random prompts of the given lengths, left-padded: ids (B, L), mask (B, L) True = real, the prompts."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, V, (n,), generator=gen) for n in lengths]
    L = max(lengths)
    ids = torch.stack([torch.cat([torch.full((L - len(p),), pad_id), p]) for p in prompts])  # (B, L)
    mask = torch.stack([torch.arange(L) >= L - len(p) for p in prompts])  # (B, L)
    return ids, mask, prompts


def _decode_unpadded(model, prompt, steps):
    """Reference: one row alone, unpadded, KV cache, no mask -> logits (1 + T, V) of prefill and each step."""
    logits, cache = model.forward_with_cache(prompt[None])  # (1, V)
    out = [logits[0]]
    for nxt in steps:
        logits, cache = model.forward_with_cache(nxt.view(1, 1), cache)
        out.append(logits[0])
    return torch.stack(out)


def _decode_padded(model, ids, mask, steps):
    """The batch, left-padded, with the key-padding mask -> logits (1 + T, B, V) and the final caches."""
    logits, cache = model.forward_with_cache(ids, key_padding_mask=mask)  # (B, V)
    out = [logits]
    for nxt in steps:  # (B,)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)  # (B, S + 1): the new key is real
        logits, cache = model.forward_with_cache(nxt[:, None], cache, key_padding_mask=mask)
        out.append(logits)
    return torch.stack(out), cache


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("pos_embed", ["rotary", "head_rotary", "none"])
def test_left_padded_rows_match_unpadded_rows_through_the_kv_cache(pos_embed, backend):
    torch.manual_seed(0)
    m = build_model(model_preset("debug", pos_embed=pos_embed, attn_backend=backend, loss_impl="torch")).eval()
    ids, mask, prompts = _padded_batch([7, 3, 5, 1])  # row 0 unpadded, rows 1-3 with 4, 2 and 6 pads
    steps = torch.randint(2, V, (6, len(prompts)), generator=torch.Generator().manual_seed(1))  # (T, B)
    got, cache = _decode_padded(m, ids, mask, steps)  # (1 + T, B, V)
    for b, p in enumerate(prompts):
        want = _decode_unpadded(m, p, steps[:, b])  # (1 + T, V)
        d = (got[:, b] - want).abs()
        print(f"{pos_embed}/{backend} row {b}: max {d.max():.2e} mean {d.mean():.2e}")
        torch.testing.assert_close(got[:, b], want, rtol=0, atol=ATOL)
    assert all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in cache)  # padded K/V stay finite


def test_padded_rotary_cache_is_the_unpadded_cache():
    """Per-row positions: a padded row's cached (rotated) keys are the unpadded row's, not shifted by its pads.

    (RoPE scores depend on position differences only, so the logits agree either way up to fp32 rounding of the
    larger angles; the cache shows which positions were used.)
    """
    torch.manual_seed(0)
    m = build_model(model_preset("debug", pos_embed="rotary", attn_backend="sdpa", loss_impl="torch")).eval()
    ids, mask, prompts = _padded_batch([7, 3])
    _, ref_cache = m.forward_with_cache(prompts[1][None])
    _, cache = m.forward_with_cache(ids, key_padding_mask=mask)
    _, shifted = m.forward_with_cache(ids, key_padding_mask=mask, positions=torch.arange(7).expand(2, 7))
    for (k, _), (k_ref, _), (k_shift, _) in zip(cache, ref_cache, shifted):
        torch.testing.assert_close(k[1, -3:], k_ref[0], rtol=0, atol=ATOL)
        assert (k_shift[1, -3:] - k_ref[0]).abs().max() > 1e-2  # positions 4, 5, 6 instead of 0, 1, 2


def test_padded_positions_and_mask():
    mask = torch.tensor([[True, True, True, True], [False, False, True, True]])
    assert padded_positions(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]  # offset -(number of pads)
    full = padded_causal_mask(mask, Sq=4, causal=True)[:, 0]  # (B, Sq, Sk)
    assert full[0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    assert full[1].tolist() == [[True, False, False, False], [False, True, False, False],  # pads see themselves
                                [False, False, True, False], [False, False, True, True]]
    last = padded_causal_mask(mask, Sq=1, causal=True)[:, 0, 0]  # decoding: bottom-right aligned
    assert torch.equal(last, mask)


def test_rotary_per_row_positions_equal_the_offset_path():
    rot = RotaryEmbedding(16, 10_000.0, by_head=False)
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    by_offset = rot(q, k, offset=4)
    by_row = rot(q, k, positions=torch.arange(4, 9).expand(2, 5))
    assert torch.equal(by_offset[0], by_row[0]) and torch.equal(by_offset[1], by_row[1])
    rows = rot(q, k, positions=torch.tensor([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]))
    assert torch.equal(rows[0][1], by_offset[0][1]) and torch.equal(rows[0][0], rot(q, k)[0][0])


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("Sq", [6, 1])
def test_masked_attention_real_rows_equal_unpadded_attention(backend, Sq):
    gen = torch.Generator().manual_seed(0)
    B, Sk, H, D = 3, 6, 2, 16
    q = torch.randn(B, Sq, H, D, generator=gen)
    k, v = torch.randn(B, Sk, H, D, generator=gen), torch.randn(B, Sk, H, D, generator=gen)
    n_real = [6, 4, 1]
    mask = torch.stack([torch.arange(Sk) >= Sk - n for n in n_real])  # (B, Sk), left padding
    out = attention(q, k, v, causal=True, backend=backend, key_padding_mask=mask)  # (B, Sq, H, D)
    for b, n in enumerate(n_real):
        rows = min(Sq, n)  # the queries at real positions
        ref = attention(q[b : b + 1, Sq - rows :], k[b : b + 1, -n:], v[b : b + 1, -n:], causal=True, backend="eager")
        torch.testing.assert_close(out[b : b + 1, Sq - rows :], ref, rtol=0, atol=ATOL)
    assert torch.isfinite(out).all()  # queries at padded positions see their own key: no empty softmax row


def test_mask_input_checks():
    q = torch.randn(2, 3, 1, 8)
    with pytest.raises(TypeError, match="bool"):
        attention(q, q, q, key_padding_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, Sk\]"):
        attention(q, q, q, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
