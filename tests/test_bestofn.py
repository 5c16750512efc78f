"""Best-of-n keeps the highest-reward sample; the CLI runs end to end."""
from __future__ import annotations

import json

import torch

from rlhfkit.models.reward import load_reward
from rlhfkit.rl.bestofn import best_of_n
from rlhfkit.rl.rollout import SamplingParams
from tests.rl_utils import PROMPTS, make_policy_dir


def test_best_of_n_picks_the_max(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    out = best_of_n(tiny_model, tiny_tokenizer, PROMPTS[:4], load_reward("rule:vowels"), 6,
                    SamplingParams(max_new_tokens=10))
    assert len(out) == 4
    for r in out:
        assert len(r["completions"]) == 6 and r["reward"] == max(r["rewards"])
        assert r["completion"] == r["completions"][r["rewards"].index(r["reward"])]
    best = sum(r["reward"] for r in out) / 4
    avg = sum(sum(r["rewards"]) / 6 for r in out) / 4
    assert best > avg


def test_bestofn_cli(tmp_path, tiny_tokenizer, tiny_model_cfg, capsys):
    from rlhfkit.cli import main

    policy = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    out = tmp_path / "best.jsonl"
    assert main(["bestofn", policy, "The movie", "I think", "-n", "3", "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The movie", "I think"] and all(len(r["rewards"]) == 3 for r in rows)
    assert "best-of-3: mean reward" in capsys.readouterr().out
