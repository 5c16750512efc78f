"""rlhfkit eval: a model against itself changes nothing (KL exactly 0, win rate 1/2); a different policy
shows a positive KL; the JSON has every number with an interval, and the report renders it."""
from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import EvalConfig, ModelConfig, from_dict
from rlhfkit.eval.evaluate import evaluate
from rlhfkit.models.factory import build_model
from rlhfkit.utils.checkpoint import save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, vader_texts):
    d = tmp_path_factory.mktemp("eval")
    # a: a near-uniform random model (init std 0.02); b: a peaked one (std 0.5), far from a in KL.
    for name, seed, std in (("a", 0, 0.02), ("b", 1, 0.5)):
        torch.manual_seed(seed)
        save_model(d / name, build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=128,
                                                     init_std=std), tiny_tokenizer), tiny_tokenizer)
    (d / "prompts.txt").write_text("\n".join(" ".join(t.split()[:5]) for t in vader_texts[:12]) + "\n")
    (d / "held_out.txt").write_text("\n".join(vader_texts[-20:]) + "\n")
    return d


def cfg(d, policy, reference, out):
    return from_dict(EvalConfig, {
        "policy": str(d / policy), "reference": str(d / reference) if reference else "",
        "data": {"source": str(d / "prompts.txt")},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 10, "prompts_per_step": 5},
        "reward": "rule:length", "gold": "rule:vowels", "ppl_source": str(d / "held_out.txt"),
        "samples_in_report": 3, "out": str(out), "run": {"device": "cpu", "seed": 4}})


def test_model_against_itself_changes_nothing(setup, tmp_path):
    r = evaluate(cfg(setup, "a", "a", tmp_path / "eval.json"))
    assert r["n_prompts"] == 12
    for key in ("proxy_reward", "gold_reward", "judge_compound", "judge_positive_rate", "length"):
        assert r[f"{key}_before"] == r[f"{key}_after"], key
        assert r[f"{key}_after"]["low"] <= r[f"{key}_after"]["mean"] <= r[f"{key}_after"]["high"]
    assert r["kl_mean"]["mean"] == 0.0
    assert r["win_rate_vs_reference"]["mean"] == 0.5
    assert r["ppl_before"] == r["ppl_after"] and r["ppl_after"] > 1
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["samples"]) == 3 and saved["samples"][0]["before"] == saved["samples"][0]["after"]


def test_different_policy_has_positive_kl_and_report_renders(setup, tmp_path):
    r = evaluate(cfg(setup, "b", "a", tmp_path / "eval.json"))
    # b's samples are likely under b and near 1/V under a: several nats per completion.
    assert r["kl_mean"]["low"] > 1.0
    assert r["samples"][0]["before"] != r["samples"][0]["after"] or r["length_before"] != r["length_after"]
    from rlhfkit.eval.report import build_report

    page = build_report(tmp_path).read_text()
    assert "Evaluation" in page and "proxy reward" in page.replace("_", " ")


def test_policy_alone(setup, tmp_path):
    r = evaluate(cfg(setup, "a", "", tmp_path / "e.json"))
    assert "kl_mean" not in r and "proxy_reward_after" in r and "proxy_reward_before" not in r
