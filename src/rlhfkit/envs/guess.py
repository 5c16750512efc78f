"""Guess the number: a multi-turn environment that answers every turn ("higher" / "lower").

Episode `seed` hides a number in [low, high]; each policy turn is read for its first integer. A right
guess ends the episode with reward 1 (success); a wrong one gets a hint and the next turn; after
`max_turns` turns the episode is truncated with reward 0. A turn with no number gets `invalid_hint`.
Held-out episodes (split=test) hide numbers from a different stream of seeds than split=train.
"""
from __future__ import annotations

import random
import re

from rlhfkit.envs.base import Env, Observation

_INT = re.compile(r"-?\d+")


class GuessNumberEnv(Env):
    def __init__(self, low: int = 1, high: int = 8, max_turns: int = 4, split: str = "train",
                 invalid_hint: str = "a number, please") -> None:
        if not low < high:
            raise ValueError(f"guess_number: low={low} must be < high={high}")
        if max_turns < 1:
            raise ValueError(f"guess_number: max_turns={max_turns} must be >= 1")
        if split not in ("train", "test"):
            raise ValueError(f"guess_number: split must be train or test, got {split!r}")
        self.low, self.high, self.max_turns, self.split = low, high, max_turns, split
        self.invalid_hint = invalid_hint
        self.secret, self.turn = None, 0

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[Observation, dict]:
        rng = random.Random(f"{self.split}:{seed}")  # str seeds hash stably (not PYTHONHASHSEED-dependent)
        self.secret, self.turn = rng.randint(self.low, self.high), 0
        return f"Guess my number from {self.low} to {self.high}.", {"secret": self.secret}

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict]:
        if self.secret is None:
            raise RuntimeError("step() before reset()")
        self.turn += 1
        m = _INT.search(action)
        guess = int(m.group()) if m else None
        if guess == self.secret:
            return "", 1.0, True, False, {"success": True, "turns": self.turn}
        out_of_turns = self.turn >= self.max_turns
        hint = self.invalid_hint if guess is None else ("higher" if guess < self.secret else "lower")
        return hint, 0.0, False, out_of_turns, {"success": False, "turns": self.turn}
