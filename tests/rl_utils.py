"""Helpers for the RL tests: a tiny policy saved in HF format, prompts, rule rewards."""
from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ["The movie", "I think", "This film is", "What a", "The acting", "My favorite", "It was", "A story",
           "The best", "Nobody", "The plot", "Honestly", "The ending", "Such a", "The music", "Overall"]


def make_policy_dir(root: Path, tokenizer, model_cfg, seed: int = 0) -> str:
    """A tiny from-scratch Llama (2 layers, 64 dims) + tokenizer saved where `model.name_or_path` can load it."""
    from rlhfkit.models.factory import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg, tokenizer)
    d = root / "policy"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


def write_prompts(root: Path) -> str:
    p = root / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return str(p)


def rl_cfg(cls, policy: str, prompts: str, run_dir: Path, **over):
    """A small, fast config for the tiny policy: 8 prompts x 4 samples x 8 tokens per step."""
    from rlhfkit.config import check_config

    cfg = cls()
    cfg.model.name_or_path = policy
    cfg.data.source = prompts
    cfg.rollout.max_new_tokens = 8
    cfg.reward.spec = "rule:vowels"
    cfg.optim.lr = 3e-3
    cfg.optim.max_steps = 20
    cfg.log.run_dir = str(run_dir)
    cfg.log.tensorboard = False
    cfg.log.progress = False
    cfg.log.save_every = 0
    cfg.log.eval_every = 0
    cfg.run.threads = 1
    for k, v in over.items():
        obj = cfg
        *head, last = k.split(".")
        for h in head:
            obj = getattr(obj, h)
        setattr(obj, last, v)
    check_config(cfg)
    return cfg


def reward_curve(run_dir: Path) -> list[float]:
    from rlhfkit.utils.logging import read_jsonl

    return [r["rollout/reward_mean"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "rollout/reward_mean" in r]
