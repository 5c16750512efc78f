"""Scalar head: values per token, score at the last real token under left or right padding, save/load."""
from __future__ import annotations

import torch

from rlhfkit.models.heads import ScalarHeadModel, last_token_index


def test_last_token_index_left_and_right_padding():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [2, 4, 4]


def test_score_is_padding_invariant_and_round_trips(tiny_model, tmp_path):
    torch.manual_seed(0)
    rm = ScalarHeadModel.from_causal_lm(tiny_model, init_std=0.5).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    pad = 1
    right = torch.tensor([[5, 6, 7, 8, pad, pad]])
    left = torch.tensor([[pad, pad, 5, 6, 7, 8]])
    with torch.no_grad():
        s0 = rm.score(ids, torch.ones_like(ids))
        sr = rm.score(right, (right != pad).long())
        sl = rm.score(left, (left != pad).long())
    assert torch.allclose(s0, sr, atol=1e-5) and torch.allclose(s0, sl, atol=1e-5)
    rm.save_pretrained(tmp_path / "rm")
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.allclose(again.score(ids, torch.ones_like(ids)), s0, atol=1e-6)


def test_zero_init_head_gives_zero_values(tiny_model):
    v = ScalarHeadModel.from_causal_lm(tiny_model)(torch.tensor([[3, 4, 5]]))
    assert v.shape == (1, 3) and torch.all(v == 0)
