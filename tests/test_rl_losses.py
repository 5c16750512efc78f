"""RL losses and KL controllers against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController
from rlhfkit.rl.losses import (
    aggregate,
    clipped_surrogate,
    dpo_loss,
    explained_variance,
    kl_penalty,
    policy_loss,
    reinforce_loss,
    sequence_policy_loss,
    value_loss,
)

E = math.e


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_clipped_surrogate_by_hand():
    # log-ratio +1 -> ratio e; -1 -> ratio 1/e. clip 0.2.
    logp = t([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    adv = t([[1.0, -1.0, 1.0, -1.0]])
    loss, ratio, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # A=+1, ratio=e: min(e, 1.2) = 1.2 -> loss -1.2 (clipped, no gradient)
    # A=-1, ratio=e: the unclipped term is the pessimistic one -> loss e (still has gradient)
    # A=+1, ratio=1/e: unclipped -> loss -1/e
    # A=-1, ratio=1/e: clip at 0.8 -> loss 0.8 (clipped)
    assert loss[0].tolist() == pytest.approx([-1.2, E, -1 / E, 0.8], rel=1e-6)
    assert ratio[0].tolist() == pytest.approx([E, E, 1 / E, 1 / E], rel=1e-6)
    assert clipped[0].tolist() == [True, False, False, True]
    # Asymmetric clip (DAPO clip-higher): upper bound 1.28.
    loss_hi, _, _ = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert loss_hi[0, 0].item() == pytest.approx(-1.28)


def test_aggregation_token_vs_sequence():
    per_tok = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_tok, mask, "token").item() == pytest.approx(10 / 4)  # (1+2+3+4)/4
    assert aggregate(per_tok, mask, "sequence").item() == pytest.approx((2 + 4) / 2)  # mean of per-seq means
    # A global normalizer makes micro-batches add up to the batch loss.
    parts = sum(aggregate(per_tok[i:i + 1], mask[i:i + 1], "token", normalizer=4.0) for i in range(2))
    assert parts.item() == pytest.approx(2.5)


def test_on_policy_gradient_is_the_policy_gradient():
    # One on-policy step: old = logp.detach(), ratio 1 everywhere, so the gradient is -A/N per token.
    logp = t([[-1.0, -2.0], [-0.5, -3.0]]).requires_grad_()
    adv = t([[2.0], [-1.0]])
    mask = t([[1, 1], [1, 0]])
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(2 + 2 - 1) / 3)
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0 and stats["ratio_mean"].item() == 1


def test_sequence_policy_loss_rloo_style():
    seq = t([-3.0, -1.0]).requires_grad_()
    adv = t([1.0, -2.0])
    loss, _ = sequence_policy_loss(seq, seq.detach(), adv, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)
    assert seq.grad.tolist() == pytest.approx([-0.5, 1.0])


def test_value_loss_by_hand():
    old = t([[1.0, 1.0, 1.0]])
    returns = t([[0.0, 2.0, 2.0]])
    values = t([[2.0, 0.5, 1.5]])
    mask = torch.ones(1, 3)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # v=2:   (2-0)^2=4   vs clipped 1.2 -> 1.44: max 4     -> 2.0
    # v=0.5: (0.5-2)^2=2.25 vs clipped 0.8 -> 1.44: max 2.25 -> 1.125
    # v=1.5: 0.25 vs clipped 1.2 -> 0.64: max 0.64 (clipped) -> 0.32
    assert loss.item() == pytest.approx((2.0 + 1.125 + 0.32) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    plain, _ = value_loss(values, old, returns, mask, clip=0.0)
    assert plain.item() == pytest.approx((2.0 + 1.125 + 0.125) / 3)


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - math.log(0.5))  # ref/p - 1 - log(ref/p)
    # All three agree (0) on-policy, and k3 is unbiased: E_p[k3] = KL(p||q) on a 2-token distribution.
    p, q = t([0.7, 0.3]), t([0.4, 0.6])
    exact = (p * (p / q).log()).sum()
    k3 = (p * kl_penalty(p.log(), q.log(), "k3")).sum()
    k1 = (p * kl_penalty(p.log(), q.log(), "k1")).sum()
    assert k3.item() == pytest.approx(exact.item(), rel=1e-5) and k1.item() == pytest.approx(exact.item(), rel=1e-5)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_dpo_and_ipo_by_hand():
    # chosen: policy -1 vs ref -2 (+1); rejected: policy -3 vs ref -2 (-1): h = 2.
    pc, pr, rc, rr = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(0.5 * 2)
    assert stats["margin"].item() == pytest.approx(1.0) and stats["accuracy"].item() == 1.0
    assert stats["reward_chosen"].item() == pytest.approx(0.5) and stats["reward_rejected"].item() == pytest.approx(-0.5)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, kind="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)))


def test_explained_variance():
    r = t([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(r, r, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(r), r, m).item() == pytest.approx(0.0)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    ada = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ada.update(2.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert ada.value == pytest.approx(0.102)
    ada.update(0.9, 10)  # error -0.1
    assert ada.value == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    again = AdaptiveKLController(0.5, 1.0, 100)
    again.load_state_dict(ada.state_dict())
    assert again.value == ada.value


def test_reinforce_loss_by_hand():
    seq = t([-3.0, -1.0]).requires_grad_()
    loss = reinforce_loss(seq, t([1.0, -2.0]))
    loss.backward()
    assert loss.item() == pytest.approx(-(1 * -3 + -2 * -1) / 2)  # = 0.5
    assert seq.grad.tolist() == pytest.approx([-0.5, 1.0])


def test_logprobs_and_entropy_match_the_separate_ops():
    from rlhfkit.models.ops import entropy_from_logits, gather_logprobs, logprobs_and_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5))
    lp, ent = logprobs_and_entropy(logits, ids)
    assert torch.allclose(lp, gather_logprobs(logits, ids), atol=1e-6)
    assert torch.allclose(ent, entropy_from_logits(logits), atol=1e-6) and not ent.requires_grad
    g1 = torch.autograd.grad(lp.sum(), logits)[0]
    g2 = torch.autograd.grad(gather_logprobs(logits, ids).sum(), logits)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    _, ent_g = logprobs_and_entropy(logits, ids, entropy_grad=True)
    assert torch.allclose(torch.autograd.grad(ent_g.sum(), logits)[0],
                          torch.autograd.grad(entropy_from_logits(logits).sum(), logits)[0], atol=1e-6)


def test_logprobs_given_logz_is_log_softmax_with_its_gradient():
    from rlhfkit.models.ops import gather_logprobs, logprobs_given_logz

    # By hand: logits [0, ln 3] -> softmax [1/4, 3/4]; token 1 -> log(3/4); d/dlogits = onehot - softmax.
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    lp = logprobs_given_logz(logits, torch.tensor([[1]]), torch.tensor([[math.log(4.0)]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    lp.sum().backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-0.25, 0.25], abs=1e-6)
    # Any shape, a non-contiguous view (as replay's logits are), weighted gradients.
    torch.manual_seed(0)
    base = torch.randn(5, 3, 11, requires_grad=True)
    logits = base.transpose(0, 1)  # (3, 5, 11), strided
    ids = torch.randint(0, 11, (3, 5))
    w = torch.randn(3, 5)
    lp = logprobs_given_logz(logits, ids, torch.logsumexp(logits.detach(), -1))
    assert torch.allclose(lp, gather_logprobs(logits, ids), atol=1e-6)
    g1 = torch.autograd.grad((lp * w).sum(), base)[0]
    g2 = torch.autograd.grad((gather_logprobs(logits, ids) * w).sum(), base)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    # With a temperature: log softmax(logits / T), gradient included (by hand for T = 2: logits [0, 2 ln 3]
    # are [0, ln 3] scaled, so the same 3/4, and the gradient is halved).
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]], requires_grad=True)
    lp = logprobs_given_logz(logits, torch.tensor([[1]]), torch.tensor([[math.log(4.0)]]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    lp.sum().backward()
    assert logits.grad.flatten().tolist() == pytest.approx([-0.125, 0.125], abs=1e-6)
    logits = base.transpose(0, 1)
    lp = logprobs_given_logz(logits, ids, torch.logsumexp(logits.detach() / 0.7, -1), temperature=0.7)
    assert torch.allclose(lp, gather_logprobs(logits / 0.7, ids), atol=1e-6)
    g1 = torch.autograd.grad((lp * w).sum(), base)[0]
    g2 = torch.autograd.grad((gather_logprobs(logits / 0.7, ids) * w).sum(), base)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_token_logprobs_in_one_pass_equal_torch_log_softmax():
    """Without gradients gather_logprobs takes one pass of ours per row (native.token_logprobs): by hand,
    against torch's log_softmax in float64 on a strided view (as the reference's time-major logits are),
    peaked rows and a vocabulary that is not a multiple of the vector width; out-of-range ids fall back to
    torch (which raises), and logits with gradients keep autograd's path."""
    from rlhfkit.accel import native
    from rlhfkit.models.ops import gather_logprobs

    if not native.native_status().startswith("on"):
        pytest.skip(f"our kernels are {native.native_status()}")
    lp = native.token_logprobs(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    torch.manual_seed(0)
    base = torch.randn(7, 5, 2051) * 4
    base[0, 0, 17] = 80.0  # one token holds nearly all the mass
    base[1, 2] = -30.0      # a flat row far below zero
    logits = base.transpose(0, 1)  # (5, 7, 2051), rows contiguous, not the tensor
    ids = torch.randint(0, 2051, (5, 7))
    ids[0, 0] = 17
    ours = native.token_logprobs(logits, ids)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(gather_logprobs(logits, ids), ours, rtol=0, atol=0)
    bad = ids.clone()
    bad[1, 1] = 2051
    assert native.token_logprobs(logits, bad) is None
    with pytest.raises(RuntimeError):
        gather_logprobs(logits, bad)
    x = logits.clone().requires_grad_(True)
    assert native.token_logprobs(x, ids) is None
    gather_logprobs(x, ids).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("temperature,part", [(1.0, False), (0.7, False), (1.0, True)])
def test_logprobs_given_logz_backward_in_one_pass_equals_torch_ops(temperature, part, monkeypatch):
    """The logits' gradient of logprobs_given_logz in one pass of ours (native.logz_backward) against the
    torch ops it replaces, on a strided view of a 2,051-entry vocabulary (and on some rows of it: a
    micro-batch of a time-major record), with the gradient laid out as the view is (no copy downstream)."""
    from rlhfkit.accel import native
    from rlhfkit.models.ops import logprobs_given_logz

    if not native.native_status().startswith("on"):
        pytest.skip(f"our kernels are {native.native_status()}")
    torch.manual_seed(0)
    base = (torch.randn(6, 8 if part else 4, 2051) * 3).requires_grad_(True)
    logits = (base[:, 2:6] if part else base).transpose(0, 1)
    ids = torch.randint(0, 2051, (4, 6))
    logz = torch.logsumexp(logits.detach() / temperature, -1)
    w = torch.randn(4, 6)
    seen = []
    real = native.logz_backward
    monkeypatch.setattr(native, "logz_backward", lambda *a: seen.append(1) or real(*a))
    ours = torch.autograd.grad((logprobs_given_logz(logits, ids, logz, temperature) * w).sum(), base)[0]
    assert seen
    direct = real(logits.detach(), ids, logz, w, 1 / temperature)
    assert direct.shape == logits.shape and direct.transpose(0, 1).is_contiguous()
    monkeypatch.setattr(native, "logz_backward", lambda *a: None)
    theirs = torch.autograd.grad((logprobs_given_logz(logits, ids, logz, temperature) * w).sum(), base)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
