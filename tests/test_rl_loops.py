"""The RL loops learn a learnable rule on a tiny policy in seconds, resume exactly, and stop cleanly on NaN.

The rule is `rule:vowels` (the fraction of letters that are vowels): a random 2-layer policy starts near
0.37 and can push it towards 1 by preferring vowel-heavy tokens, a signal present in every sample.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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
    # The reference's prompt cache (accelerated path): steps 1 and 2 draw the 16 prompts once each, step 3
    # starts the next epoch.
    if os.environ.get("RLHFKIT_ACCEL", "").lower() != "off":
        assert [r["perf/ref_cache_hit_frac"] for r in rows] == [0.0, 0.0, 1.0]
    else:
        assert all("perf/ref_cache_hit_frac" not in r for r in rows)


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
    from rlhfkit.rl import ppo

    policy, prompts = setup
    cfg = rl_cfg(PPOConfig, policy, prompts, tmp_path / "nanloss", **{
        "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 1, "optim.max_steps": 2})
    real = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), real(*a, **k)[1]))
    with pytest.raises(TrainingError, match=r"loss is inf \(1 value\(s\)\) at step 1; .*no checkpoint was written yet"):
        ppo.train(cfg)
    assert not (tmp_path / "nanloss" / "final").exists()


@pytest.mark.parametrize("algo,cls,over", [
    ("grpo", GRPOConfig, {"kl.coef": 0.05}),
    ("ppo", PPOConfig, {"rollout.samples_per_prompt": 1, "rollout.prompts_per_step": 8}),
])
def test_micro_batching_gives_the_same_updates(algo, cls, over, setup, tmp_path):
    """Micro-batches of 2 rows (GRPO: whole groups, prompts shared) give the loss, gradient norm and update of
    one batch. (Compared after one step: later, Adam's g / sqrt(v) turns float rounding in near-zero
    gradients into lr-sized differences.)"""
    import importlib

    from safetensors.torch import load_file

    from rlhfkit.utils.logging import read_jsonl

    train = importlib.import_module(f"rlhfkit.rl.{algo}").train
    policy, prompts = setup
    base = {"rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 2, "optim.max_steps": 1,
            "optim.lr": 1e-4, **over}
    weights, logs = [], []
    for bs in (64, 2):
        run = tmp_path / f"mb{bs}"
        train(rl_cfg(cls, policy, prompts, run, **{**base, "optim.batch_size": bs}))
        weights.append(load_file(str(run / "final" / "model.safetensors")))
        logs.append(read_jsonl(run / "metrics.jsonl")[0])
    for key in ("grad_norm", "loss/policy", "policy/entropy") + (("loss/value",) if algo == "ppo" else ()):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-7), key
    init = load_file(str(Path(policy) / "model.safetensors"))
    for k in weights[0]:
        d0, d1 = weights[0][k] - init[k], weights[1][k] - init[k]
        assert torch.allclose(d0, d1, atol=2e-6), (k, (d0 - d1).abs().max())


def test_cli_runs_a_stage(setup, tmp_path, capsys):
    """`rlhfkit rloo --flags` goes through the config parser to the loop and writes the run directory."""
    from rlhfkit.cli import main

    policy, prompts = setup
    rc = main(["rloo", "--model.name_or_path", policy, "--data.source", prompts, "--optim.max_steps", "2",
               "--rollout.prompts_per_step", "2", "--rollout.max_new_tokens", "4", "--log.run_dir",
               str(tmp_path / "cli"), "--log.tensorboard", "false", "--log.progress", "false"])
    assert rc == 0
    assert (tmp_path / "cli" / "final" / "config.json").exists() and (tmp_path / "cli" / "summary.json").exists()
    assert "rloo:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a bad combination is rejected by the parser, exit status 2
        main(["grpo", "--rollout.samples_per_prompt", "1", "--model.name_or_path", policy])
    assert e.value.code == 2 and "samples_per_prompt >= 2" in capsys.readouterr().err
