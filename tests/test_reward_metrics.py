"""Agreement metrics against hand-worked values, and the frozen-feature encoder's disk cache."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhfkit.eval import reward_metrics as M


def test_pearson_spearman_and_ranks_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: centred products sum to 4, each sum of squares is 5 -> r = 0.8.
    assert M.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert M.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # Spearman only sees order: any monotone transform of x gives 1.
    x = np.array([0.1, 0.5, 2.0, 7.0])
    assert M.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant input: defined as 0, not NaN


def test_pairwise_accuracy_by_hand():
    means = np.array([0.0, 1.0, 2.5, 3.0])
    scores = np.array([0.0, 2.0, 1.0, 3.0])
    # Pairs with |mean gap| >= 1: (1,0) (2,0) (3,0) (2,1) (3,1) -> the scores get (2,1) wrong: 4 / 5.
    m = M.pairwise_accuracy(scores, means, 1.0)
    assert (m["pair_acc"], m["n_pairs"], m["ties"]) == (pytest.approx(0.8), 5, 0)
    # Pairs across groups are not compared: group a = {0, 1}, b = {2, 3} -> only (1, 0) qualifies.
    m = M.pairwise_accuracy(scores, means, 1.0, ["a", "a", "b", "b"])
    assert (m["pair_acc"], m["n_pairs"]) == (1.0, 1)
    # A score tie is not a win; counted as such, and as half a win in the ties-as-half figure.
    m = M.pairwise_accuracy(np.array([1.0, 1.0]), np.array([0.0, 2.0]), 1.0)
    assert (m["pair_acc"], m["ties"], m["tie_share"], m["pair_acc_ties_half"]) == (0.0, 1, 1.0, 0.5)


def test_pair_metrics_count_ties_apart_by_hand():
    # 10 pairs: 6 right, 3 tied, 1 wrong -> strict 0.6, ties 3 (0.3), ties as half (6 + 1.5) / 10 = 0.75.
    d = np.array([1, 2, 3, 0.5, 0.1, 9, 0, 0, 0, -1.0])
    m = M.pair_metrics(d)
    assert (m["pair_acc"], m["ties"], m["tie_share"], m["pair_acc_ties_half"], m["n_pairs"]) == (
        pytest.approx(0.6), 3, pytest.approx(0.3), pytest.approx(0.75), 10)
    # Wilson 95% for 6 / 10: centre (0.6 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.79208 / 1.38416 = 0.57225,
    # half-width 1.96 sqrt(0.024 + 1.96^2 / 400) / 1.38416 = 0.25958 -> [0.31267, 0.83183].
    assert (m["pair_acc_lo"], m["pair_acc_hi"]) == (pytest.approx(0.31267, abs=1e-4),
                                                    pytest.approx(0.83183, abs=1e-4))
    assert M.wilson_interval(0, 0) != M.wilson_interval(0, 0)  # nan: nothing to count


def test_rater_preference_by_hand():
    # a = [2, 0], b = [1, 1]: of the 4 (a, b) rating pairs, 2 > and 2 <: 0.5.
    assert M.rater_preference([2, 0], [1, 1]) == 0.5
    # a = [1, 2], b = [1]: one tie (1/2) and one win -> (1 + 0.5) / 2 = 0.75.
    assert M.rater_preference([1, 2], [1]) == 0.75


def test_preference_scale_recovers_a_planted_temperature_and_ece():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 2, 5000)
    target = 1 / (1 + np.exp(-0.7 * d))  # soft targets from s = 0.7 exactly
    assert M.preference_scale(d, target) == pytest.approx(0.7, rel=1e-3)
    err, table = M.ece(target, target)
    assert err == pytest.approx(0.0, abs=1e-12) and sum(r["n"] for r in table) == 5000
    # Predicting 0.9 where raters say 0.6, and 0.2 where they say 0.2: ECE = 0.5 * 0.3 + 0.5 * 0 = 0.15.
    err, table = M.ece(np.array([0.9, 0.9, 0.2, 0.2]), np.array([0.6, 0.6, 0.2, 0.2]))
    assert err == pytest.approx(0.15) and [r["bin"] for r in table] == ["0.2-0.3", "0.9-1.0"]


def test_one_rater_r_on_planted_noise():
    # Each rating = truth + independent noise of the same size: r(one, mean of 9 others) has a closed form,
    # var(t) / sqrt((var t + var e) * (var t + var e / 9)) with var t = var e = 1: 1 / sqrt(2 * 10 / 9).
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 1, 20000)
    ratings = (truth[:, None] + rng.normal(0, 1, (20000, 10))).tolist()
    assert M.one_rater_r(ratings) == pytest.approx(1 / math.sqrt(2 * 10 / 9), abs=0.01)


def test_vader_lexicon_scores_sentiment():
    s = M.vader_scores(["A wonderful, moving film.", "A boring, awful mess.", "The film is 90 minutes long."])
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0


def test_sample_pairs_stay_in_group_and_never_pair_an_item_with_itself():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"]  # c has one item: no pair possible, so 900 * 8 / 9 pairs
    a, b = M.sample_pairs(groups, 900, np.random.default_rng(0))
    g = np.array(groups)
    assert len(a) == 800 and np.all(a != b) and np.all(g[a] == g[b]) and "c" not in set(g[a])


def test_encoder_cache_reuses_features_and_is_keyed_by_model(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from rlhfkit.models.embeddings import Encoder
    from rlhfkit.utils.checkpoint import save_model

    lm = save_model(tmp_path / "lm", tiny_model, tiny_tokenizer)
    enc = Encoder(str(lm), cache_dir=tmp_path / "cache", batch_size=2)
    texts = ["a short one", "a somewhat longer text here", "mid length"]
    first = enc.encode(texts)
    # Batched in length order with padding, yet the same as encoding each text alone.
    alone = torch.cat([enc([t]) for t in texts]).numpy()
    assert np.allclose(first, alone, atol=1e-5)
    calls = []
    real_call = Encoder.__call__
    monkeypatch.setattr(Encoder, "__call__",
                        lambda self, t, p=None: (calls.append(list(t)), real_call(self, t, p))[1])
    again = enc.encode(texts[::-1] + ["new text"])
    assert calls == [["new text"]]  # only the unseen text went through the model
    assert np.allclose(again[:3], first[::-1])
    # A different model (here: other max_len) has another key, so it never reads these features.
    other = Encoder(str(lm), cache_dir=tmp_path / "cache", max_len=4)
    assert other.key != enc.key
    assert len(list((tmp_path / "cache" / enc.key).glob("*.npz"))) == 2


def test_encoder_with_fewer_blocks_equals_that_hidden_state(tmp_path, tiny_model, tiny_tokenizer):
    from rlhfkit.models.embeddings import Encoder, mean_pool
    from rlhfkit.utils.checkpoint import save_model

    lm = save_model(tmp_path / "lm", tiny_model, tiny_tokenizer)
    texts = ["a short one", "a somewhat longer text here"]
    full = Encoder(str(lm))
    enc = full.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = full.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        output_hidden_states=True).hidden_states
    # Llama's hidden_states[k] is the input of block k (no final norm), except the last one.
    one = Encoder(str(lm), layers=1)
    assert len(one.model.layers) == 1
    zero = Encoder(str(lm), layers=0)
    emb = mean_pool(full.model.embed_tokens(enc["input_ids"]), enc["attention_mask"])
    normed = mean_pool(full.model.norm(hs[1]), enc["attention_mask"])
    assert torch.allclose(one(texts), normed, atol=1e-5)
    assert torch.allclose(zero(texts), mean_pool(full.model.norm(full.model.embed_tokens(enc["input_ids"])),
                                                 enc["attention_mask"]), atol=1e-5)
    assert not torch.allclose(zero(texts), emb)
    assert len({full.key, one.key, zero.key}) == 3
