"""RL in an environment through the one driver: a tiny random policy learns the multi-turn guessing game
with GRPO (held-out success rate up, non-overlapping 95% intervals), every RL stage runs an environment,
and `rlhfkit eval` reports the success rate and pass@k."""
from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import EnvConfig, GRPOConfig, PPOConfig, REINFORCEConfig, RLOOConfig
from tests.env_utils import word_tokenizer
from tests.rl_utils import rl_cfg

GAME = {"low": 1, "high": 4, "max_turns": 3}


@pytest.fixture
def policy_dir(tmp_path):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.factory import build_model

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=96), tok)
    d = tmp_path / "policy"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def env_cfg(cls, policy, run_dir, **over):
    """rl_utils' small config with the guessing game in place of prompts + reward (both left at their
    defaults, which an environment requires)."""
    from rlhfkit.config import PromptDataConfig

    base = {"env.name": "guess_number", "env.kwargs": dict(GAME), "rollout.max_new_tokens": 2,
            "rollout.prompts_per_step": 8, "rollout.samples_per_prompt": 4, "optim.max_steps": 2}
    return rl_cfg(cls, policy, PromptDataConfig().source, run_dir, **{**base, **over})


def success(model_dir, problems=100):
    from transformers import AutoTokenizer

    from rlhfkit.envs.evaluate import evaluate_env
    from rlhfkit.models.factory import load_causal_lm
    from rlhfkit.rl.rollout import SamplingParams

    model, tok = load_causal_lm(model_dir), AutoTokenizer.from_pretrained(model_dir)
    r = evaluate_env(model, tok, EnvConfig(name="guess_number", kwargs=dict(GAME)), problems, 1, [1],
                     SamplingParams(max_new_tokens=2), seed=1)
    return r["metrics"]["success_rate"]


def test_tiny_policy_learns_the_guessing_game_with_grpo(policy_dir, tmp_path, capsys):
    from rlhfkit.rl import grpo
    from rlhfkit.utils.logging import read_jsonl

    before = success(policy_dir)
    cfg = env_cfg(GRPOConfig, policy_dir, tmp_path / "run", **{"optim.max_steps": 40})
    summary = grpo.train(cfg)
    after = success(summary["final_model"])
    with capsys.disabled():  # the figure of docs/envs.md (pytest -s)
        print(f"held-out success rate: {before} -> {after}")
    assert after["low"] > before["high"], (before, after)  # held-out (split=test) episodes
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "env/success_rate" in r]
    assert len(rows) == 40 and all(r["env/errors"] == 0 for r in rows)
    from rlhfkit.eval.report import build_report

    assert "Environment success rate" in build_report(tmp_path / "run").read_text()  # the curve
    header = capsys.readouterr().out.splitlines()[0]
    assert "environment guess_number" in header and "up to 3 turns per episode" in header
    assert "replay record is single-turn only" in header


@pytest.mark.parametrize("cls,mod,over", [(PPOConfig, "ppo", {"rollout.samples_per_prompt": 1}),
                                          (RLOOConfig, "rloo", {"env.max_turns": 2}),
                                          (REINFORCEConfig, "reinforce", {})])
def test_every_rl_stage_trains_in_an_environment(policy_dir, tmp_path, cls, mod, over):
    import importlib

    from rlhfkit.models.factory import load_causal_lm

    cfg = env_cfg(cls, policy_dir, tmp_path / "run", **over)
    summary = importlib.import_module(f"rlhfkit.rl.{mod}").train(cfg)
    if cfg.env.max_turns:
        from rlhfkit.utils.logging import read_jsonl

        assert max(r["env/turns_mean"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                   if "env/turns_mean" in r) <= 2
    a, b = load_causal_lm(policy_dir), load_causal_lm(summary["final_model"])
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_eval_cli_reports_success_rate_and_pass_at_k(policy_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--policy", policy_dir, "--reference", policy_dir, "--env.name", "guess_number",
               "--env.kwargs", json.dumps(GAME), "--env_problems", "12", "--rollout.samples_per_prompt", "4",
               "--rollout.max_new_tokens", "2", "--pass_k", "1,4", "--out", str(out), "--run.threads", "1"])
    assert rc in (0, None)
    ev = json.loads(out.read_text())
    assert ev["env_kwargs"]["split"] == "test" and ev["n_prompts"] == 12
    for key in ("success_rate_after", "pass@1_after", "pass@4_after", "success_rate_before"):
        assert 0.0 <= ev[key]["low"] <= ev[key]["mean"] <= ev[key]["high"] <= 1.0
    assert ev["pass@1_after"]["mean"] == pytest.approx(ev["success_rate_after"]["mean"])
    assert ev["pass@4_after"]["mean"] >= ev["pass@1_after"]["mean"]
    assert ev["success_rate_after"] == ev["success_rate_before"]  # the same model, the same episodes
    assert "success_rate" in capsys.readouterr().out
    from rlhfkit.eval.report import build_report

    html = build_report(tmp_path).read_text()
    assert "success rate" in html and "pass@4" in html  # before/after table and bars


def test_pass_at_k_is_the_unbiased_estimator():
    from rlhfkit.envs.evaluate import pass_at_k

    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)


def test_a_broken_environment_is_skipped_and_counted_or_stops_the_run(policy_dir, tmp_path, capsys):
    from rlhfkit.envs import EnvError
    from rlhfkit.rl import grpo
    from rlhfkit.utils.logging import read_jsonl

    over = {"env.name": "tests.env_utils:Broken", "env.kwargs": {"how": "raise", "at": 2}, "env.step_timeout_s": 5.0,
            "optim.max_steps": 1, "rollout.prompts_per_step": 2}
    grpo.train(env_cfg(GRPOConfig, policy_dir, tmp_path / "skip", **over))
    row = next(r for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl") if "env/errors" in r)
    assert row["env/errors"] == 8 and row["rollout/reward_mean"] == 0.0  # every episode: scored 0, counted
    assert "episode skipped: environment tests.env_utils:Broken, episode seed" in capsys.readouterr().out
    with pytest.raises(EnvError, match="turn 2: KeyError: 'boom'.*env.on_error=skip"):
        grpo.train(env_cfg(GRPOConfig, policy_dir, tmp_path / "stop", **over, **{"env.on_error": "stop"}))


def test_grpo_on_a_reasoning_task(tmp_path, tiny_tokenizer, tiny_model_cfg):
    pytest.importorskip("reasoning_gym")
    from rlhfkit.rl import grpo
    from rlhfkit.utils.logging import read_jsonl
    from tests.rl_utils import make_policy_dir

    tiny_model_cfg.max_seq_len = 128
    policy = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    cfg = env_cfg(GRPOConfig, policy, tmp_path / "run", **{"env.kwargs": {"task": "chain_sum", "size": 50},
                                                           "env.name": "reasoning", "data.template": "chat",
                                                           "rollout.max_new_tokens": 6, "rollout.prompts_per_step": 2})
    grpo.train(cfg)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "env/success_rate" in r]
    assert len(rows) == 2 and rows[0]["env/turns_mean"] == 1.0
