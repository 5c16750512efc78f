"""Reward losses against values and gradients worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.train.reward_losses import (
    bradley_terry_loss,
    ranking_loss,
    ranking_pair_indices,
    ranking_to_pairs,
    regression_loss,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bt_loss_and_gradients_by_hand():
    # Pair 1: r_c - r_r = 1 -> -log sig(1) = log(1 + e^-1) = 0.313262; pair 2: diff 0 -> log 2.
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, stats = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2, abs=1e-6)
    loss.backward()
    # d/d r_c of -log sig(d) / B = -sig(-d) / B: -0.268941 / 2 and -0.5 / 2; r_r gets the opposite.
    assert rc.grad.tolist() == pytest.approx([-sig(-1) / 2, -0.25], abs=1e-6)
    assert rr.grad.tolist() == pytest.approx([sig(-1) / 2, 0.25], abs=1e-6)
    # Accuracy counts diff > 0 strictly: the tie is not a win.
    assert stats["reward/accuracy"] == 0.5 and stats["reward/margin"] == pytest.approx(0.5)


def test_bt_margin_is_subtracted_inside_the_sigmoid():
    # diff 1 with margin 1 -> logits 0 -> loss log 2, gradient -1/2 on r_chosen.
    rc = torch.tensor([1.0], requires_grad=True)
    loss, _ = bradley_terry_loss(rc, torch.tensor([0.0]), margin=torch.tensor([1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert rc.grad.item() == pytest.approx(-0.5, abs=1e-6)
    # Zero weight removes a pair from the mean: only the second pair (diff 3) counts.
    loss, _ = bradley_terry_loss(torch.tensor([-5.0, 3.0]), torch.tensor([0.0, 0.0]),
                                 weight=torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3)), abs=1e-6)


def test_bt_is_stable_for_large_differences():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(200.0, rel=1e-6)  # log(1 + e^200) = 200 + tiny, not inf


def test_ranking_pairs_expansion():
    assert ranking_to_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    pairs = ranking_to_pairs(list(range(5)))
    assert len(pairs) == 10 == len(set(pairs))
    assert all(c < r for c, r in pairs)  # the better-ranked item (lower position) is always chosen
    better, worse = ranking_pair_indices(2)
    assert better.tolist() == [0] and worse.tolist() == [1]
    assert ranking_to_pairs(["only"]) == []


def test_ranking_loss_by_hand():
    # Rewards [2, 1, 0] in rank order: pair diffs 1, 2, 1.
    r = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    loss, stats = ranking_loss(r)
    l1, l2 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))
    assert loss.item() == pytest.approx((2 * l1 + l2) / 3, abs=1e-6)
    loss.backward()
    # d/dr0 = -(sig(-1) + sig(-2)) / 3; r1 wins one and loses one pair of diff 1: gradient 0.
    g = (sig(-1) + sig(-2)) / 3
    assert r.grad.tolist()[0] == pytest.approx([-g, 0.0, g], abs=1e-6)
    assert stats["reward/accuracy"] == 1.0 and stats["reward/pairs"] == 3


def test_ranking_loss_averages_per_ranking_and_masks_padding():
    # Ranking A: full K = 3 -> mean of its 3 pairs; ranking B: only 2 real completions -> its one pair.
    r = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ranking_loss(r, mask)
    l1, l2 = math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))
    per_group = ((2 * l1 + l2) / 3 + l1) / 2
    assert loss.item() == pytest.approx(per_group, abs=1e-6)
    # Not the flat mean over the 4 pairs (that would weigh the longer ranking 3:1).
    assert abs(loss.item() - (3 * l1 + l2) / 4) > 1e-3
    assert stats["reward/pairs"] == 4
    # A "ranking" of one completion has no pair and is skipped, not a NaN.
    loss, _ = ranking_loss(torch.tensor([[1.0, 0.0], [5.0, 0.0]]), torch.tensor([[1, 1], [1, 0]]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_ranking_of_two_is_bradley_terry():
    rc, rr = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.1, 0.4, -2.0])
    a, _ = ranking_loss(torch.stack([rc, rr], 1))
    b, _ = bradley_terry_loss(rc, rr)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_regression_loss_by_hand():
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, stats = regression_loss(pred, torch.tensor([0.0, 0.0]), weight=torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx((1 * 1 + 4 * 3) / 4)  # 3.25
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([2 * 1 * 1 / 4, 2 * 2 * 3 / 4])  # 2 err w / sum w
    assert stats["reward/mae"] == pytest.approx((1 + 6) / 4)
