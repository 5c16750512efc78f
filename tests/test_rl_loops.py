"""The RL loops learn a learnable rule on a tiny policy in seconds, resume exactly, and stop cleanly on NaN.

The rule is `rule:vowels` (the fraction of letters that are vowels): a random 2-layer policy starts near
0.37 and can push it towards 1 by preferring vowel-heavy tokens, a signal present in every sample.
"""
from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import GRPOConfig, PPOConfig, REINFORCEConfig, RLOOConfig
from rlhfkit.errors import TrainingError
from tests.rl_utils import make_policy_dir, reward_curve, rl_cfg, write_prompts


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_model_cfg):
    return make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg), write_prompts(tmp_path)


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algo,cls,over", [
    ("grpo", GRPOConfig, {}),
    ("rloo", RLOOConfig, {"optim.lr": 1e-2}),
    ("reinforce", REINFORCEConfig, {"rollout.prompts_per_step": 16, "rollout.samples_per_prompt": 2, "optim.lr": 1e-2}),
    ("ppo", PPOConfig, {"rollout.prompts_per_step": 32, "rollout.samples_per_prompt": 1}),
])
def test_reward_goes_up(algo, cls, over, setup, tmp_path):
    import importlib

    policy, prompts = setup
    # A light KL penalty (the loops' KL paths are exercised by the resume tests): this is about learning.
    base = {"rollout.prompts_per_step": 8, "rollout.samples_per_prompt": 4, "optim.max_steps": 30,
            "optim.lr": 5e-3, "kl.coef": 0.01}
    cfg = rl_cfg(cls, policy, prompts, tmp_path / algo, **{**base, **over})
    summary = importlib.import_module(f"rlhfkit.rl.{algo}").train(cfg)
    curve = reward_curve(tmp_path / algo)
    assert len(curve) == 30 and summary["steps"] == 30
    first, last = mean(curve[:5]), mean(curve[-5:])
    assert last > first + 0.15, (algo, first, last, curve)
    # The final policy is saved in HF format and loads back.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary["final_model"]) is not None


def test_ppo_logs_every_metric_and_samples(setup, tmp_path):
    from rlhfkit.rl.ppo import train

    policy, prompts = setup
    cfg = rl_cfg(PPOConfig, policy, prompts, tmp_path / "ppo", **{
        "rollout.prompts_per_step": 8, "rollout.samples_per_prompt": 2, "optim.max_steps": 3, "epochs": 2,
        "mini_batches": 2, "optim.batch_size": 4, "kl.target": 1.0, "log.eval_every": 2,
        "reward.missing_eos_penalty": 0.5, "reward.length_penalty": 0.01, "whiten_rewards": True,
        "entropy_coef": 0.01, "rollout.top_k": 50, "rollout.top_p": 0.95})
    train(cfg)
    from rlhfkit.utils.logging import read_jsonl

    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    for key in ("rollout/reward_mean", "rollout/reward_std", "kl/mean", "policy/entropy", "ppo/clipfrac",
                "ppo/approx_kl", "loss/value", "value/explained_variance", "rollout/length_mean",
                "perf/tokens_per_s", "perf/s_per_step", "kl/coef"):
        assert all(key in r and r[key] is not None for r in rows), key
    # 2 epochs x 2 mini-batches: the later updates are off-policy, so the ratio moves and KL appears.
    assert rows[-1]["ppo/approx_kl"] > 0
    # Adaptive KL: the coefficient moved from its start value.
    assert rows[-1]["kl/coef"] != pytest.approx(0.05)
    # Penalties: the shaped score is below the raw reward (length penalty on every token).
    assert rows[0]["rollout/score_mean"] < rows[0]["rollout/reward_mean"]
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 3] and samples[0]["text"].startswith("| prompt | completion")


@pytest.mark.parametrize("algo,cls", [("ppo", PPOConfig), ("grpo", GRPOConfig)])
def test_exact_resume(algo, cls, setup, tmp_path):
    """Stop after 2 of 4 steps (a checkpoint), resume: the metrics equal those of an uninterrupted run."""
    import importlib

    train = importlib.import_module(f"rlhfkit.rl.{algo}").train
    policy, prompts = setup
    over = {"rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 2, "optim.max_steps": 4,
            "kl.coef": 0.05, "log.save_every": 2}
    train(rl_cfg(cls, policy, prompts, tmp_path / "full", **over))
    first = rl_cfg(cls, policy, prompts, tmp_path / "split", **{**over, "optim.max_steps": 2})
    train(first)
    train(rl_cfg(cls, policy, prompts, tmp_path / "split", **over))  # resumes from step 2

    from rlhfkit.utils.logging import read_jsonl

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time_s"))} for r in rows]

    full = strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    split = strip(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert split == full


def nan_reward(prompts, completions):
    return [float("nan") if "o" in c else 0.5 for c in completions]


def test_nan_reward_stops_with_last_good_checkpoint(setup, tmp_path):
    from rlhfkit.rl.grpo import train

    policy, prompts = setup
    cfg = rl_cfg(GRPOConfig, policy, prompts, tmp_path / "nan", **{
        "rollout.prompts_per_step": 4, "optim.max_steps": 3, "log.save_every": 1,
        "reward.spec": "rule:tests.test_rl_loops:nan_reward_after_two_steps"})
    _calls["n"] = 0
    with pytest.raises(TrainingError) as e:
        train(cfg)
    msg = str(e.value)
    assert "reward is nan" in msg and "at step 3" in msg
    assert "step-000002" in msg  # the last good checkpoint, named
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]


_calls = {"n": 0}


def nan_reward_after_two_steps(prompts, completions):
    _calls["n"] += 1
    return [float("nan")] * len(completions) if _calls["n"] >= 3 else [0.5] * len(completions)


def test_nan_loss_stops(setup, tmp_path, monkeypatch):
    import rlhfkit.rl.ppo as ppo

    policy, prompts = setup
    cfg = rl_cfg(PPOConfig, policy, prompts, tmp_path / "nanloss", **{
        "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 1, "optim.max_steps": 2})
    real = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), real(*a, **k)[1]))
    with pytest.raises(TrainingError, match=r"loss is inf \(1 value\(s\)\) at step 1; .*no checkpoint was written yet"):
        ppo.train(cfg)
    assert not (tmp_path / "nanloss" / "final").exists()
