"""Advantages, returns, whitening and baselines against hand-computed values and plain-loop references."""
from __future__ import annotations

import pytest
import torch

from rlhfkit.rl.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    normalize,
    shape_scores,
    token_rewards,
    whiten,
)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def gae_reference(rewards, values, lengths, gamma, lam):
    """The textbook recursion, one completion at a time, in plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            last = delta + gamma * lam * last
            adv[b][i] = last
    ret = [[adv[b][i] + (values[b][i] if i < lengths[b] else 0.0) for i in range(T)] for b in range(B)]
    return adv, ret


def test_gae_by_hand():
    # r = [0, 1], V = [0.5, 0.25], gamma 1, lam 0.5:
    # delta_1 = 1 + 0 - 0.25 = 0.75 = A_1; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    adv, ret = gae(t([[0.0, 1.0]]), t([[0.5, 0.25]]), torch.ones(1, 2), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.125, 0.75])
    assert ret[0].tolist() == pytest.approx([0.625, 1.0])


def test_gae_matches_plain_loop_with_ragged_lengths():
    torch.manual_seed(0)
    B, T = 5, 7
    lengths = [7, 3, 1, 5, 6]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    rewards, values = torch.randn(B, T) * mask, torch.randn(B, T)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
        assert torch.allclose(adv, t(ref_adv), atol=1e-5)
        assert torch.allclose(ret, t(ref_ret), atol=1e-5)
    # lam = 1: returns are the discounted returns whatever the critic says.
    _, ret = gae(rewards, values, mask, 0.9, 1.0)
    assert torch.allclose(ret, discounted_returns(rewards, mask, 0.9), atol=1e-5)


def test_discounted_returns_by_hand():
    r = t([[1.0, 0.0, 2.0]])
    assert discounted_returns(r, torch.ones(1, 3), 0.5)[0].tolist() == pytest.approx([1.5, 1.0, 2.0])
    # The reward after the end of the completion does not leak back.
    assert discounted_returns(r, t([[1, 1, 0]]), 0.5)[0].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_whiten_by_hand():
    x = t([1.0, 2.0, 3.0, 4.0])
    sd = (5 / 3) ** 0.5  # unbiased std
    assert whiten(x).tolist() == pytest.approx([(v - 2.5) / sd for v in [1, 2, 3, 4]], rel=1e-5)
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([(v - 2.5) / sd + 2.5 for v in [1, 2, 3, 4]],
                                                                 rel=1e-5)
    masked = whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]))
    assert masked.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)


def test_group_baselines_by_hand():
    r = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two groups of 3
    grpo = group_advantages(r, 3, "grpo", "group", eps=0.0)
    s2 = 12 ** 0.5  # std of (0, 0, 6)
    assert grpo.tolist() == pytest.approx([-1.0, 0.0, 1.0, -2 / s2, -2 / s2, 4 / s2], rel=1e-5)
    assert group_advantages(r, 3, "grpo", "none").tolist() == pytest.approx([-1, 0, 1, -2, -2, 4])
    batch = group_advantages(r, 3, "grpo", "batch", eps=0.0)
    assert batch.tolist() == pytest.approx((t([-1, 0, 1, -2, -2, 4]) / r.std()).tolist(), rel=1e-5)
    # Leave-one-out: r_i minus the mean of the other two.
    assert group_advantages(r, 3, "rloo").tolist() == pytest.approx([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    with pytest.raises(ValueError):
        group_advantages(r, 4, "grpo")
    assert normalize(t([1.0, 3.0]), eps=0.0).tolist() == pytest.approx([-(2 ** -0.5), 2 ** -0.5], rel=1e-5)


def test_token_rewards_and_penalties_by_hand():
    scores = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    r = token_rewards(scores, kl, mask, kl_coef=0.5)
    assert r.tolist() == [pytest.approx([-0.05, 0.9, 0.0]), pytest.approx([-0.2, -0.25, 1.7])]
    shaped = shape_scores(t([1.0, 1.0]), torch.tensor([True, False]), torch.tensor([3, 5]),
                          missing_eos_penalty=0.5, length_penalty=0.1)
    assert shaped.tolist() == pytest.approx([0.7, 0.0])
