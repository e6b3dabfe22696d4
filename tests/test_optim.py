"""t2i_ds.trainer.optim: CheckedAdamW (ZeRO stage 0 in fp32) clips as torch does and skips a non-finite step whole."""

from __future__ import annotations

import copy

import pytest
import torch

from t2i_ds.config import apply_overrides, preset
from t2i_ds.trainer.optim import CheckedAdamW, make_optimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]


def _grads(params, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)


@pytest.mark.parametrize("max_norm,scale", [(1.0, 10.0), (1.0, 0.01), (0.0, 10.0)])
def test_a_finite_step_is_torch_clip_then_adamw(max_norm, scale):
    ours, ref = _params(), _params()
    opt, ref_opt = CheckedAdamW(ours, max_norm=max_norm, **KW), torch.optim.AdamW(ref, **KW)
    for step in range(3):
        _grads(ours, step, scale), _grads(ref, step, scale)
        want = torch.nn.utils.get_total_norm([p.grad for p in ref])
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step(), ref_opt.step()
        assert not opt.overflow and float(opt._global_grad_norm) == pytest.approx(float(want), rel=1e-6)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])  # 1e30: the fp32 norm overflows
def test_a_nonfinite_step_changes_no_weight_moment_or_count(bad):
    params = _params()
    opt = CheckedAdamW(params, max_norm=1.0, **KW)
    _grads(params, 0)
    opt.step()
    before = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    _grads(params, 1)
    params[1].grad[2] = bad
    opt.step()
    assert opt.overflow and opt._global_grad_norm == float("inf")
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    after = opt.state_dict()["state"]
    for i, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after[i][key], value), (i, key)  # exp_avg, exp_avg_sq and the step count
    _grads(params, 2)  # the next good step applies and clears the flag
    opt.step()
    assert not opt.overflow and not torch.equal(params[0], before[0][0])


def test_make_optimizer_checks_only_when_asked_and_fuses():
    cfg = apply_overrides(preset("debug"), ["optim.grad_clip=0.5"])
    checked = make_optimizer(_params(), cfg, checked=True)
    plain = make_optimizer(_params(), cfg, checked=False)
    assert type(checked) is CheckedAdamW and checked.max_norm == 0.5
    assert type(plain) is torch.optim.AdamW
    for opt in (checked, plain):
        assert opt.defaults["fused"] is True and opt.defaults["lr"] == cfg.optim.lr


def test_a_closure_recomputes_the_gradients_before_the_check():
    params = _params()
    opt = CheckedAdamW(params, max_norm=1.0, **KW)
    before = params[0].detach().clone()

    def closure():
        loss = sum((p * p).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not opt.overflow and not torch.equal(params[0], before)
    nan = lambda: (params[0].sum() * float("nan")).backward() or torch.tensor(0.0)  # noqa: E731
    opt.zero_grad()
    moved = params[0].detach().clone()
    opt.step(nan)
    assert opt.overflow and torch.equal(params[0], moved)
