"""Prompts + a reward (rule, Python function or reward model) as a single-turn environment: the RL
stages' `data` + `reward` sections run through the same episode path as any other environment."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.envs.base import SingleTurnEnv


class RewardEnv(SingleTurnEnv):
    """Episode `seed` is prompt number seed (mod the number of prompts); the reward function scores the
    whole batch at once. Success (for the logs): reward >= `success_at`."""

    def __init__(self, prompts: Any, reward_fn: Any, success_at: float = 1.0) -> None:
        super().__init__()
        self.prompts, self.reward_fn, self.success_at = prompts, reward_fn, success_at  # a rl.common.PromptSet

    def prompt(self, seed: int) -> tuple[str, dict]:
        i = seed % len(self.prompts.ids)
        return self.prompts.texts[i], {"prompt_ids": self.prompts.ids[i]}

    def score(self, prompts: Sequence[str], completions: Sequence[str], infos: Sequence[dict]) -> torch.Tensor:
        return self.reward_fn(prompts, completions)

    def success(self, reward: float) -> bool:
        return reward >= self.success_at
