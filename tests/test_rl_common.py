"""The accelerated clip_and_step (rlhfkit.accel) against torch's clip_grad_norm_ + optimizer.step(), which is
rl/common.py's plain one."""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.accel import clip_and_step, native


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 24), torch.nn.Linear(24, 40), torch.nn.GELU(),
                               torch.nn.Linear(40, 7))


def _grads(net: torch.nn.Module, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.SGD(ps, lr=0.1),
], ids=["fused-adamw", "fused-adam", "adamw", "sgd"])
@pytest.mark.parametrize("scale, max_norm", [(1.0, 0.5), (0.01, 1.0), (1.0, math.inf)],
                         ids=["clipped", "under-the-limit", "no-limit"])
def test_clip_and_step_is_clip_grad_norm_then_step(make, scale, max_norm):
    """The same norm and, to float rounding, the same parameters after two steps as torch's clipping then
    the step: with a fused Adam the clip factor goes into the step as its grad_scale (1 / factor)."""
    ours, theirs = _net(), _net()
    opt_ours, opt_theirs = make(list(ours.parameters())), make(list(theirs.parameters()))
    for _ in range(2):
        _grads(ours, scale)
        _grads(theirs, scale)
        norm = clip_and_step(opt_ours, list(ours.parameters()), max_norm)
        ref = float(torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm))
        opt_theirs.step()
        assert norm == pytest.approx(ref, rel=1e-6)
        assert not hasattr(opt_ours, "grad_scale")  # only for the step it was set for
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # Clipping makes a difference here (Adam too: the two steps' factors differ), so the comparison above
    # is not vacuous.
    if max_norm == 0.5:
        free = _net()
        opt_free = make(list(free.parameters()))
        for _ in range(2):
            _grads(free, scale)
            opt_free.step()
        assert not torch.allclose(free[1].weight, ours[1].weight, rtol=0, atol=1e-6)


def test_clip_and_step_spreads_a_nan_norm_as_torch_does():
    """A NaN gradient makes the norm NaN; clip_grad_norm_ multiplies every gradient by it, and so do we."""
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    _grads(net, 1.0)
    net[1].bias.grad[0] = float("nan")
    assert math.isnan(clip_and_step(opt, list(net.parameters()), 1.0))
    assert all(torch.isnan(p).all() for p in net.parameters())


def test_grad_norm_in_one_pass_is_the_total_norm():
    """Our one-pass norm over a list of tensors (sizes around the kernels' block) against torch's, and
    against float64."""
    if not native.native_status().startswith("on"):
        pytest.skip(f"our kernels are {native.native_status()}")
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(n, generator=g) * s for n, s in ((1, 3.0), (4095, 1.0), (4096, 0.1), (4097, 10.0),
                                                       (100_003, 0.5), (7, 1e3))]
    ours = native.grad_norm(ts)
    exact = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    assert ours == pytest.approx(exact, rel=1e-6)
    assert ours == pytest.approx(float(torch.nn.utils.get_total_norm(ts)), rel=1e-5)
    assert native.grad_norm([t.t() for t in torch.randn(2, 3, 4).unbind(0)]) is None  # not contiguous
    assert native.grad_norm([]) is None
