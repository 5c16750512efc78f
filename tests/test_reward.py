"""Reward models: planted weights recovered, feedback exports read, split by item, end-to-end training of
linear and deep (full and LoRA) reward models on a learnable task with a tiny in-process LM, and the saved
models loading behind the one reward interface."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from rlhfkit.config import RewardConfig, from_dict
from rlhfkit.data.reward_data import RatedText, load_reward_data, rated_groups, rated_pairs, split_of
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.models.reward import load_reward
from rlhfkit.train import reward as R

POS, NEG = ["great", "wonderful", "superb", "lovely"], ["awful", "boring", "dull", "terrible"]
FILLER = ["the", "film", "plot", "was", "and", "actors", "story", "it"]


def synthetic_texts(n: int, seed: int) -> list[tuple[str, float]]:
    """Six-word texts; the true score is (#positive - #negative) words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(FILLER, 6))
        n_pos, n_neg = rng.integers(0, 3), rng.integers(0, 3)
        for k in range(n_pos):
            words[k] = str(rng.choice(POS))
        for k in range(n_neg):
            words[5 - k] = str(rng.choice(NEG))
        out.append((" ".join(words).capitalize(), float(n_pos - n_neg)))
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_lm_dir(tmp_path, tiny_model, tiny_tokenizer):
    from rlhfkit.utils.checkpoint import save_model

    return str(save_model(tmp_path / "tiny_lm", tiny_model, tiny_tokenizer))


@pytest.fixture
def ratings_file(tmp_path):
    rng = np.random.default_rng(1)
    recs = []
    for i, (text, score) in enumerate(synthetic_texts(240, 0)):
        for a in range(4):  # four annotators, each a noisy copy of the true score
            recs.append({"prompt": "", "completion": text, "item_id": f"t{i}", "annotator": f"ann{a}",
                         "rating": float(np.clip(round(score + rng.normal(0, 0.5)), -4, 4))})
    return write_jsonl(tmp_path / "ratings.jsonl", recs)


@pytest.fixture
def pairs_file(tmp_path):
    texts = synthetic_texts(1200, 2)
    recs = []
    for i in range(0, len(texts) - 1, 2):
        (a, sa), (b, sb) = texts[i], texts[i + 1]
        if sa != sb:
            c, r = (a, b) if sa > sb else (b, a)
            recs.append({"prompt": "", "chosen": c, "rejected": r, "item_id": f"p{i}", "annotator": "x"})
    return write_jsonl(tmp_path / "pairs.jsonl", recs)


def cfg_for(tmp_path, **sections) -> RewardConfig:
    base = {"log": {"run_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False, "log_every": 5,
                    "eval_every": 10, "save_every": 0},
            "run": {"threads": 1}, "data": {"test_fraction": 0.2, "val_fraction": 0.1}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return from_dict(RewardConfig, base)


# --------------------------------------------------------------------------------------------------
# Linear fits on synthetic features
# --------------------------------------------------------------------------------------------------
def test_closed_form_ridge_recovers_planted_w():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2000, 8, generator=g)
    w_true, b_true = torch.randn(8, generator=g), 0.7
    y = Z @ w_true + b_true + 0.01 * torch.randn(2000, generator=g)
    ex = [R.Example(["x"], float(t)) for t in y]
    w, b = R.fit_linear_weights(Z, torch.arange(2000), ex, "regression", lam=1e-3)
    assert torch.allclose(w, w_true, atol=1e-2) and b == pytest.approx(b_true, abs=1e-2)
    # Weights (target=individual) change the solution only if they are informative: here they are not.
    ex_w = [R.Example(["x"], float(t), weight=3.0) for t in y]
    w3, _ = R.fit_linear_weights(Z, torch.arange(2000), ex_w, "regression", lam=3e-3)
    assert torch.allclose(w3, w, atol=1e-4)


def test_bt_fit_recovers_planted_w_from_sampled_preferences():
    # Preferences drawn from the BT model itself: the maximum-likelihood w is consistent, scale included.
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(400, 5, generator=g)
    w_true = torch.tensor([1.5, -1.0, 0.5, 0.0, 2.0])
    i, j = torch.randint(0, 400, (20000,), generator=g), torch.randint(0, 400, (20000,), generator=g)
    p = torch.sigmoid(Z[i] @ w_true - Z[j] @ w_true)
    i_wins = torch.rand(20000, generator=g) < p
    chosen, rejected = torch.where(i_wins, i, j), torch.where(i_wins, j, i)
    ex = [R.Example(["c", "r"]) for _ in range(20000)]
    flat = torch.stack([chosen, rejected], 1).reshape(-1)
    w, b = R.fit_linear_weights(Z, flat, ex, "bt", lam=0.0)
    assert b == 0.0
    assert torch.allclose(w, w_true, atol=0.1), w
    # The K-wise ranking fit on the same pairs (K = 2) is the same objective, so the same w.
    w_rank, _ = R.fit_linear_weights(Z, flat, ex, "ranking", lam=0.0)
    assert torch.allclose(w_rank, w, atol=1e-3)


def test_batch_loss_layouts():
    s = torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0])
    # bt: (chosen, rejected) pairs in order -> diffs 2 and -2.
    loss, st = R.batch_loss("bt", s[:4], [R.Example(["a", "b"]), R.Example(["c", "d"])])
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2, abs=1e-6)
    assert st["reward/accuracy"] == 0.5
    # ranking: groups of 3 and 2 -> the first ranking [3, 1, 0], the second [2, 5] (wrong way round).
    loss, st = R.batch_loss("ranking", s, [R.Example(["a", "b", "c"]), R.Example(["d", "e"])])
    first = (2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-3)) + 0 * 0) / 3
    first = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3)) + math.log1p(math.exp(-1))) / 3
    assert loss.item() == pytest.approx((first + math.log1p(math.exp(3))) / 2, abs=1e-6)
    assert st["reward/pairs"] == 4


# --------------------------------------------------------------------------------------------------
# Data: exports, rater halves, split
# --------------------------------------------------------------------------------------------------
def test_exports_become_rated_texts_and_rankings(tmp_path):
    ratings = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "completion": " A", "rating": 3, "annotator": "bob", "item_id": "i1"},
        {"prompt": "Q", "completion": " A", "rating": 1, "annotator": "amy", "item_id": "i1"},
        {"prompt": "Q", "completion": " B", "rating": -2, "annotator": "cat", "item_id": "i2"}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "P", "chosen": "good", "rejected": "bad", "margin": 2.0, "annotator": "amy"},
        {"prompt": "P", "chosen": "same", "rejected": "same2", "tie": True, "annotator": "amy"}])
    ranks = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "", "completions": ["x", "y", "z"], "annotator": "amy"}])
    edits = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "E", "original": "teh", "edited": "the", "annotator": "amy"}])
    d = load_reward_data([str(ratings), str(pairs), str(ranks), str(edits)], [])
    assert [(it.key, it.text, it.ratings) for it in d.rated] == [("i1", "Q A", [3.0, 1.0]), ("i2", "Q B", [-2.0])]
    assert [(rk.completions, rk.margin, rk.source) for rk in d.rankings] == [
        (["good", "bad"], 2.0, "pair"), (["x", "y", "z"], 0.0, "ranking"), (["the", "teh"], 0.0, "edit")]
    assert d.skipped == {"tie": 1}
    # Rater halves: annotators in sorted order amy, bob, cat -> even = amy, cat; odd = bob.
    even = load_reward_data([str(ratings)], [], raters="even")
    assert [(it.key, it.ratings) for it in even.rated] == [("i1", [1.0]), ("i2", [-2.0])]
    odd = load_reward_data([str(ratings)], [], raters="odd")
    assert [(it.key, it.ratings) for it in odd.rated] == [("i1", [3.0])]


def test_export_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "", "completion": "a", "rating": 1, "item_id": "1"},
        {"prompt": "", "completion": "b", "rating": "high", "item_id": "2"}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: 'rating' must be a number"):
        load_reward_data([str(bad)], [])
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "", "text": "a"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot tell the export kind"):
        load_reward_data([str(unknown)], [])
    short = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "", "completions": ["only"]}])
    with pytest.raises(DataError, match=r"k\.jsonl:1: 'completions' must be a list of at least 2"):
        load_reward_data([str(short)], [])
    with pytest.raises(DataError, match="unknown vader domain"):
        load_reward_data(["vader"], ["films"])


def test_vader_rater_halves_are_disjoint_and_cover_everyone():
    d_all = load_reward_data(["vader"], ["tweets"])
    d_even = load_reward_data(["vader"], ["tweets"], raters="even")
    d_odd = load_reward_data(["vader"], ["tweets"], raters="odd")
    for a, e, o in zip(d_all.rated[:50], d_even.rated[:50], d_odd.rated[:50]):
        assert sorted(e.ratings + o.ratings) == sorted(a.ratings)
        assert len(e.ratings) - len(o.ratings) in (0, 1)
        assert e.all_ratings == a.ratings  # evaluation always uses everyone


def test_split_by_item_is_stable_and_has_the_asked_fractions():
    keys = [f"movie/{i}" for i in range(20000)]
    s = [split_of(k, 0.1, 0.05, 0) for k in keys]
    assert abs(s.count("test") / len(s) - 0.1) < 0.01 and abs(s.count("val") / len(s) - 0.05) < 0.01
    assert s == [split_of(k, 0.1, 0.05, 0) for k in keys]  # a pure function of (seed, key)
    other = [split_of(k, 0.1, 0.05, 1) for k in keys]
    assert s != other


def test_rated_comparisons_respect_gap_domain_and_order():
    items = [RatedText(f"k{i}", "a" if i < 10 else "b", "", f"t{i}", [float(i % 10)]) for i in range(20)]
    rng = np.random.default_rng(0)
    pairs = rated_pairs(items, 5, 2.0, rng)
    assert pairs
    for i, j, gap in pairs:
        assert items[i].domain == items[j].domain and items[i].mean - items[j].mean == gap >= 2.0
    for g in rated_groups(items, 30, 3, 1.0, rng):
        means = [items[i].mean for i in g]
        assert means == sorted(means, reverse=True) and len({items[i].domain for i in g}) == 1
        assert all(a - b >= 1.0 for a, b in itertools.pairwise(means))


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------
def test_linear_rm_on_ratings_never_sees_test_items_and_loads_behind_the_interface(
        tmp_path, ratings_file, tiny_lm_dir, monkeypatch):
    seen: list[str] = []
    real = R.make_examples

    def spy(cfg, rated, rankings, *a, **kw):
        seen.extend(it.key for it in rated)
        return real(cfg, rated, rankings, *a, **kw)

    monkeypatch.setattr(R, "make_examples", spy)
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path / "cache"))  # embeddings cache
    cfg = cfg_for(tmp_path, model={"kind": "linear", "backbone": tiny_lm_dir, "l2": [0.1, 10.0]},
                  data={"source": [str(ratings_file)]})
    summary = R.train(cfg)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["test"] and not set(seen) & set(split["test"]) and not set(seen) & set(split["val"])
    # Random features of a random 2-layer LM still carry which words occur: a linear readout works.
    assert summary["test"]["feedback"]["pearson"] > 0.8
    rm = load_reward(summary["model"])
    s = rm(["", ""], ["Great wonderful the film was superb", "Boring the plot was awful dull"])
    assert s.shape == (2,) and s[0] > s[1]
    x = torch.ones(2, requires_grad=True)
    (x * s).sum().backward()  # rewards are plain tensors: an RL loss may multiply and save them
    # The model directory stands alone: it carries a copy of the LM it reads features from.
    conf = json.loads((tmp_path / "run" / "final" / "reward_config.json").read_text())
    assert conf["features"]["encoder"] == "encoder" and conf["eval"]["test"]["feedback"]["n"] == len(split["test"])
    # Rewards are normalised on training texts: mean ~0, std ~1 there.
    train_texts = [t for t, _ in synthetic_texts(240, 0)]
    z = rm([""] * len(train_texts), train_texts)
    assert abs(z.mean().item()) < 0.25 and abs(z.std().item() - 1) < 0.25


def test_deep_bt_rm_learns_pairs_and_round_trips(tmp_path, pairs_file, tiny_lm_dir):
    cfg = cfg_for(tmp_path, model={"kind": "deep", "backbone": tiny_lm_dir, "pooling": "mean"},
                  data={"source": [str(pairs_file)]}, loss={"kind": "bt"},
                  optim={"lr": 1e-2, "max_steps": 150, "warmup_steps": 10, "batch_size": 16})
    summary = R.train(cfg)
    acc = summary["test"]["comparisons"]["pair_acc"]
    assert acc > 0.85, summary
    rm = load_reward(summary["model"])
    s = rm(["", "", ""], ["Great wonderful the film was superb", "The film was it and the", "Boring the plot was awful dull"])
    assert s[0] > s[1] > s[2]
    # A fresh load scores exactly as the saved model: weights, pooling and normalisation round-trip.
    again = load_reward(summary["model"])
    assert torch.allclose(again(["x"], [" the film"]), rm(["x"], [" the film"]), atol=1e-5)


def test_deep_lora_trains_adapters_only_and_saves_a_plain_model(tmp_path, pairs_file, tiny_lm_dir):
    from safetensors.torch import load_file

    cfg = cfg_for(tmp_path, model={"kind": "deep", "backbone": tiny_lm_dir, "pooling": "last", "lora_r": 4,
                                   "lora_alpha": 8.0},
                  data={"source": [str(pairs_file)]}, loss={"kind": "ranking"},
                  optim={"lr": 1e-2, "max_steps": 40, "warmup_steps": 2, "batch_size": 16})
    summary = R.train(cfg)
    assert summary["test"]["comparisons"]["pair_acc"] > 0.75
    final = tmp_path / "run" / "final"
    saved = load_file(str(final / "backbone" / "model.safetensors"))
    assert not any("lora" in k for k in saved)  # adapters were merged into the weights
    before = load_file(str(tmp_path / "tiny_lm" / "model.safetensors"))
    changed = [k for k in saved if ("model." + k) in before and not torch.equal(saved[k], before["model." + k])]
    # LoRA touches the linear layers only: embeddings and norms are the pretrained ones.
    assert changed and all("proj" in k for k in changed), changed


def test_config_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="lora_r is for deep"):
        from_dict(RewardConfig, {"model": {"kind": "linear", "lora_r": 8}})
    with pytest.raises(ConfigError, match="margin is for loss.kind bt"):
        from_dict(RewardConfig, {"loss": {"kind": "regression", "margin": 1.0}})
    with pytest.raises(ConfigError, match="linear features are always mean-pooled"):
        from_dict(RewardConfig, {"model": {"pooling": "cls"}})
    with pytest.raises(ConfigError, match="sum to less than 1"):
        from_dict(RewardConfig, {"data": {"test_fraction": 0.6, "val_fraction": 0.5}})


def test_regression_on_pairs_only_is_a_clear_error(tmp_path, pairs_file):
    cfg = cfg_for(tmp_path, data={"source": [str(pairs_file)]})
    with pytest.raises(DataError, match="regression needs rated texts"):
        R.train(cfg)


def test_length_grouped_batches_keep_every_example_once():
    rng = np.random.default_rng(0)
    ex = [R.Example([("", "x" * int(n))]) for n in rng.integers(1, 200, 1000)]
    out = R.length_grouped(ex, 8, rng)
    assert sorted(map(id, out)) == sorted(map(id, ex))
    spread = [np.ptp([len(e.texts[0][1]) for e in out[i:i + 8]]) for i in range(0, 992, 8)]
    assert np.mean(spread) < 20  # vs ~170 for random batches of lengths 1..199


@pytest.mark.parametrize("loss", [{"kind": "bt", "margin": 0.5, "min_gap": 1.0, "per_item": 3},
                                  {"kind": "ranking", "group_size": 3, "min_gap": 1.0},
                                  {"kind": "regression", "target": "individual"}], ids=lambda d: d["kind"])
def test_linear_rm_learns_from_ratings_with_every_loss(tmp_path, ratings_file, tiny_lm_dir, monkeypatch, loss):
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path / "cache"))
    cfg = cfg_for(tmp_path, model={"kind": "linear", "backbone": tiny_lm_dir, "l2": [1.0]},
                  data={"source": [str(ratings_file)], "max_items": 120, "raters": "odd"}, loss=loss)
    summary = R.train(cfg)
    assert summary["n_train_rated"] == 120
    m = summary["test"]["feedback"]
    assert m["pearson"] > 0.7 and m["pair_acc_gap1"] > 0.8, m
    assert "pearson_other_raters" in m  # trained on odd annotators: checked against the even ones too


def test_example_configs_parse():
    from pathlib import Path

    from rlhfkit.config import apply_mapping, check_config, load_yaml

    files = sorted((Path(__file__).parents[1] / "configs" / "reward").glob("*.yaml"))
    assert files
    for f in files:
        cfg, (data, lines) = RewardConfig(), load_yaml(f)
        apply_mapping(cfg, data, str(f), lines)  # known keys, right types
        if not Path(cfg.model.backbone).exists():
            cfg.model.backbone = "minilm"  # a model an earlier stage will write (runs/sft/final)
        check_config(cfg)


def test_deep_rm_resumes_exactly_from_a_checkpoint(tmp_path, pairs_file, tiny_lm_dir):
    import shutil

    cfg = cfg_for(tmp_path, model={"kind": "deep", "backbone": tiny_lm_dir},
                  data={"source": [str(pairs_file)]}, loss={"kind": "bt"},
                  optim={"lr": 3e-3, "max_steps": 12, "warmup_steps": 2, "batch_size": 8},
                  log={"save_every": 6, "eval_every": 6})
    R.train(cfg)
    ck = tmp_path / "run" / "checkpoints"
    straight = torch.load(ck / "step-000012" / "trainer_state.pt", weights_only=False)["model"]
    shutil.rmtree(ck / "step-000012")  # as if the run had died after step 6
    R.train(cfg)
    resumed = torch.load(ck / "step-000012" / "trainer_state.pt", weights_only=False)["model"]
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    first = torch.load(ck / "step-000006" / "trainer_state.pt", weights_only=False)["model"]
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # it did train after resuming
    # The curve has every step once: the resumed run dropped the dead run's rows after step 6, kept those
    # before, and the epoch counter went on from the checkpoint.
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/train" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 12]
    assert [r["step"] for r in rows if "val/score" in r] == [6, 12]
    assert train_rows[-1]["epoch"] > train_rows[0]["epoch"] > 0


@pytest.mark.slow
def test_minilm_reward_models_beat_the_vader_lexicon_on_held_out_movie_snippets(tmp_path):
    """Real data, real encoder: ~1 min for the linear model (20 s to encode 10.6K snippets in bf16, then
    cached), ~2 min for 150 deep steps on a 2-core CPU."""
    lin = R.train(cfg_for(tmp_path / "lin", model={"kind": "linear", "bf16": True},
                          data={"source": ["vader"], "domains": ["movie"], "test_fraction": 0.1,
                                "val_fraction": 0.05}))
    m = lin["test"]["movie"]
    assert m["pearson"] > 0.6 and m["pearson"] > m["vader_lexicon_r"] + 0.15 and m["pair_acc_gap1"] > 0.8, m
    deep = R.train(cfg_for(tmp_path / "deep", model={"kind": "deep", "bf16": True},
                           data={"source": ["vader"], "domains": ["movie"], "test_fraction": 0.1,
                                 "val_fraction": 0.05, "max_items": 3000},
                           optim={"lr": 5e-5, "max_steps": 150, "warmup_steps": 15, "batch_size": 32},
                           log={"eval_every": 50}))
    m = deep["test"]["movie"]
    assert m["pearson"] > 0.6 and m["pair_acc_gap1"] > 0.8, m


def test_missing_backbone_is_reported_before_any_work(tmp_path):
    from rlhfkit.config import RewardConfig, from_dict
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.reward import train

    cfg = from_dict(RewardConfig, {"model": {"kind": "deep", "backbone": str(tmp_path / "no_model")},
                                   "log": {"run_dir": str(tmp_path / "rm")}})
    with pytest.raises(ConfigError, match="no_model'?: not found"):
        train(cfg)
    assert not (tmp_path / "rm").exists()  # nothing written
