"""Freezing presets (paper section 3.1): the trainable set by name, and AdamW leaves frozen weights alone."""

import pytest
import torch

from t2i_ds.model.freeze import FREEZE_PRESETS, apply_freeze
from t2i_ds.model import build_model, model_preset

N_LAYERS = 4  # first half = layers 0 and 1


def _names(layers, parts):
    return {f"layers.{i}.{p}" for i in layers for p in parts}


NORMS = {"norm.weight", "norm.bias"} | _names(
    range(N_LAYERS), ["attention_norm.weight", "attention_norm.bias", "ffn_norm.weight", "ffn_norm.bias"]
)
QK_NORMS = _names(range(N_LAYERS), ["attention.q_norm.weight", "attention.q_norm.bias", "attention.k_norm.weight", "attention.k_norm.bias"])
EMBED_OUTPUT = {"tok_embeddings.weight", "output.weight"}
FFN = _names(range(N_LAYERS), ["feed_forward.w12.weight", "feed_forward.w3.weight"])
ATTN = _names(range(N_LAYERS), ["attention.in_proj.weight", "attention.out_proj.weight"])


def _model(qk_norm=False):
    torch.manual_seed(0)
    return build_model(model_preset("debug", n_layers=N_LAYERS, qk_norm=qk_norm, loss_impl="torch"))


def _expected(preset, qk_norm):
    norms = NORMS | (QK_NORMS if qk_norm else set())
    everything = EMBED_OUTPUT | norms | FFN | ATTN
    first_half = {n for n in everything if n.startswith(("layers.0.", "layers.1."))}
    return {
        "full": everything,
        "embed_output": EMBED_OUTPUT,
        "embed_output_norms": EMBED_OUTPUT | norms,
        "embed_output_norms_first_half": EMBED_OUTPUT | norms | first_half,
        "embed_output_norms_ffn": EMBED_OUTPUT | norms | FFN,
    }[preset]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("preset", list(FREEZE_PRESETS))
def test_trainable_set_by_name(preset, qk_norm):
    model = _model(qk_norm)
    report = apply_freeze(model, preset)
    expected = _expected(preset, qk_norm)
    assert set(report.trainable_names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_rotary_has_no_parameters_to_train():
    model = _model()
    assert any(n.endswith("pos_embed.inv_freq") for n, _ in model.named_buffers())
    assert not any("pos_embed" in n for n, _ in model.named_parameters())


def test_presets_reapply_and_see_through_wrappers():
    model = _model()
    apply_freeze(model, "embed_output")
    assert set(apply_freeze(model, "full").trainable_names) == _expected("full", False)  # unfreezes again
    wrapper = torch.nn.Module()
    wrapper.module = model  # DeepSpeed / DDP naming: module.<open_lm name>
    assert set(apply_freeze(wrapper, "embed_output_norms_ffn").trainable_names) == _expected("embed_output_norms_ffn", False)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="embed_output_norms_first_half"):
        apply_freeze(_model(), "embed_only")


@pytest.mark.parametrize("preset", list(FREEZE_PRESETS))
def test_adamw_updates_only_trainable(preset):
    model = _model()
    apply_freeze(model, preset)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 370, (2, 16))
    for _ in range(3):
        out = model(ids, ids.roll(-1, 1))
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have changed"
            assert opt.state[p], f"{name} should have optimizer state"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
            assert p.grad is None and p not in opt.state
