"""One interface for every reward: trained reward models and rule-based Python functions alike.

    reward = load_reward("rule:vowels")            # a built-in rule
    reward = load_reward("rule:my_pkg.mod:fn")     # any callable fn(prompts, completions) -> list[float]
    reward = load_reward("runs/reward/final")      # a trained reward model directory
    scores = reward(prompts, completions)          # torch.FloatTensor (B,)

RL, evaluation and the simulated labelers all call rewards this way, so any of them can swap in any
reward. Trained reward models store their kind in `reward_config.json`; each kind's loader lives with
its training code and is imported only when such a model is loaded.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhfkit.errors import ConfigError


class RewardFunction:
    """Base class: score completions of prompts. Higher is better."""

    name = "reward"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class RuleReward(RewardFunction):
    """Wraps a plain function fn(prompts, completions) -> sequence of floats."""

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        out = torch.as_tensor(list(self.fn(prompts, completions)), dtype=torch.float32)
        if out.shape != (len(completions),):
            raise ValueError(f"reward {self.name} returned shape {tuple(out.shape)} for "
                             f"{len(completions)} completions")
        return out


def vowel_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of ASCII letters in the completion that are vowels (0 if no letter): the reward of the
    TRL CPU peer benchmark."""
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isascii() and ch.isalpha()]
        out.append(sum(ch in "aeiouAEIOU" for ch in letters) / len(letters) if letters else 0.0)
    return out


def length_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Number of whitespace-separated words (a learnable toy reward; pair it with a KL penalty)."""
    return [float(len(c.split())) for c in completions]


BUILTIN_RULES: dict[str, Callable[[Sequence[str], Sequence[str]], Sequence[float]]] = {
    "vowels": vowel_fraction,
    "length": length_reward,
}


def load_reward(spec: str, device: str | torch.device = "cpu") -> RewardFunction:
    """A reward from a spec: rule:<builtin>, rule:<module>:<callable>, or a reward model directory."""
    if spec.startswith("rule:"):
        target = spec[5:]
        if target in BUILTIN_RULES:
            return RuleReward(BUILTIN_RULES[target], target)
        module, _, attr = target.partition(":")
        if not attr:
            raise ConfigError(f"reward {spec!r}: unknown built-in rule (have {', '.join(BUILTIN_RULES)}); "
                              "for your own function use rule:<module>:<function>")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward {spec!r}: cannot import {module}:{attr} ({e})") from None
        return fn if isinstance(fn, RewardFunction) else RuleReward(fn, target)
    path = Path(spec)
    cfg_file = path / "reward_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"reward {spec!r}: not a rule:<name> spec and no reward model there "
                          f"({cfg_file} not found)")
    kind = json.loads(cfg_file.read_text()).get("kind", "")
    loader = REWARD_MODEL_LOADERS.get(kind)
    if loader is None:
        raise ConfigError(f"{cfg_file}: unknown reward model kind {kind!r} "
                          f"(known: {', '.join(REWARD_MODEL_LOADERS) or 'none'})")
    module, _, attr = loader.partition(":")
    return getattr(importlib.import_module(module), attr)(path, device)


# Reward model kind (as written in reward_config.json) -> "module:function(path, device) -> RewardFunction".
REWARD_MODEL_LOADERS: dict[str, str] = {
    "linear": "rlhfkit.models.reward_models:load_linear",
    "deep": "rlhfkit.models.reward_models:load_deep",
}
