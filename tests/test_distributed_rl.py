"""RL under torchrun (2 processes, DDP-style gradient sums over gloo) makes the same samples, rewards, KL
and losses as one process with the same global batch, and resumes across world sizes.

The 1-process references run in this process (train(cfg)); the 2-process runs go through the CLI.
"""
from __future__ import annotations

import importlib

import pytest

from rlhfkit.config import GRPOConfig, PPOConfig, REINFORCEConfig, RLOOConfig
from rlhfkit.utils.logging import read_jsonl
from tests.rl_utils import make_policy_dir, rl_cfg, write_prompts
from tests.test_distributed import TORCHRUN, run

KEYS = ("rollout/reward_mean", "rollout/reward_std", "rollout/length_mean", "kl/mean", "kl/coef", "loss/policy",
        "policy/entropy", "ppo/clipfrac", "grad_norm")
PPO_KEYS = ("loss/value", "ppo/approx_kl", "value/mean", "value/explained_variance")


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_model_cfg):
    d = tmp_path / "setup"
    d.mkdir()
    return make_policy_dir(d, tiny_tokenizer, tiny_model_cfg), write_prompts(d)


def flags(over: dict) -> list[str]:
    return [x for k, v in over.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def rows(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "rollout/reward_mean" in r]


def assert_same(a, b, keys, steps):
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k, ra[k], rb[k])


def base(policy, prompts, run_dir, steps, over):
    return {"model.name_or_path": policy, "data.source": prompts, "rollout.max_new_tokens": 8,
            "reward.spec": "rule:vowels", "optim.lr": 3e-3, "optim.max_steps": steps, "log.run_dir": run_dir,
            "log.tensorboard": False, "log.progress": False, "log.eval_every": 0, "log.save_every": 2,
            "run.threads": 1, "run.device": "cpu", **over}


@pytest.mark.parametrize("algo,cls,over", [
    # PPO: several epochs of shuffled mini-batches (a global permutation), whitened rewards, adaptive KL.
    ("ppo", PPOConfig, {"rollout.prompts_per_step": 8, "rollout.samples_per_prompt": 1, "epochs": 2,
                        "mini_batches": 2, "optim.batch_size": 2, "whiten_rewards": True, "kl.target": 1.0}),
    # GRPO: groups of 4 (2 groups per process), KL to the reference in the loss, batch-std advantages.
    ("grpo", GRPOConfig, {"rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 4, "optim.batch_size": 4,
                          "kl.coef": 0.05, "scale_rewards": "batch"}),
])
def test_two_processes_match_one_and_resume_with_one(algo, cls, over, setup, tmp_path):
    policy, prompts = setup
    train = importlib.import_module(f"rlhfkit.rl.{algo}").train
    # 1 process, 4 steps, uninterrupted.
    one = tmp_path / "one"
    train(rl_cfg(cls, policy, prompts, one, **base(policy, prompts, str(one), 4, over)))
    # 2 processes, 2 steps (checkpoint at step 2): the same samples, rewards, KL and losses.
    two = tmp_path / "two"
    out = run(TORCHRUN, flags(base(policy, prompts, str(two), 2, over)), algo)
    assert "2 process(es)" in out
    assert_same(rows(two), rows(one)[:2], KEYS + (PPO_KEYS if algo == "ppo" else ()), [1, 2])
    assert len(list((two / "checkpoints").iterdir())) == 1  # written once, by rank 0
    # Resume that run with 1 process: steps 3-4 are those of the uninterrupted run.
    train(rl_cfg(cls, policy, prompts, two, **base(policy, prompts, str(two), 4, over)))
    assert_same(rows(two)[2:], rows(one)[2:], KEYS + (PPO_KEYS if algo == "ppo" else ()), [3, 4])


@pytest.mark.parametrize("algo,cls,over", [
    ("rloo", RLOOConfig, {"rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 2, "optim.batch_size": 2,
                          "normalize_advantages": True, "kl.target": 1.0}),
    ("reinforce", REINFORCEConfig, {"rollout.prompts_per_step": 8, "rollout.samples_per_prompt": 1,
                                    "normalize_advantages": True}),
])
def test_rloo_and_reinforce_two_processes_match_one(algo, cls, over, setup, tmp_path):
    policy, prompts = setup
    one, two = tmp_path / "one", tmp_path / "two"
    importlib.import_module(f"rlhfkit.rl.{algo}").train(rl_cfg(cls, policy, prompts, one,
                                                               **base(policy, prompts, str(one), 2, over)))
    run(TORCHRUN, flags(base(policy, prompts, str(two), 2, over)), algo)
    assert_same(rows(two), rows(one), tuple(k for k in KEYS if k != "ppo/clipfrac" or algo == "rloo"), [1, 2])

