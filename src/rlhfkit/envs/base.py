"""The environment API: gymnasium's conventions, with text for observations and actions.

    env = envs.make("guess_number", high=8)
    obs, info = env.reset(seed=3)                     # obs: a str (a user turn) or a list of chat messages
    obs, reward, terminated, truncated, info = env.step("4")
    info["success"]                                   # set by every built-in on the step that ends an episode

An action is the text of one policy turn. An observation is what the environment says next: a string (one
user turn) or a list of chat messages ({"role": ..., "content": ...}; e.g. a tool result). `terminated`
means the episode reached an end state (solved, failed for good), `truncated` that it was cut short (too
many turns). Rewards come per step; an episode's return is their sum.

Where we depart from gymnasium, and why: there are no `observation_space` / `action_space` (text in, text
out: the tokenizer is the space) and no `render`; environments do not import gymnasium, so a bare install
needs nothing more. `SingleTurnEnv` also scores a whole batch in one call (`score`), so a reward model runs
batched exactly as before.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rlhfkit.errors import RLHFKitError

Message = dict[str, str]
Observation = str | list[Message]

ROLES = ("system", "user", "assistant", "tool")


class EnvError(RLHFKitError, RuntimeError):
    """An environment failed (raised, answered malformed output, or hung) and the run stops."""


class Env:
    """A text environment. Subclasses implement `reset` and `step`; `max_turns` bounds an episode."""

    max_turns: int = 1

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[Observation, dict]:
        raise NotImplementedError

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SingleTurnEnv(Env):
    """One prompt, one answer, one reward: `prompt(seed)` and a verifier `score(prompts, completions)`."""

    max_turns = 1

    def __init__(self) -> None:
        self._prompt: str | None = None
        self._info: dict = {}

    def prompt(self, seed: int) -> tuple[str, dict]:
        """The prompt text of episode `seed` and its info (e.g. the reference answer)."""
        raise NotImplementedError

    def score(self, prompts: Sequence[str], completions: Sequence[str], infos: Sequence[dict]) -> list[float]:
        """The reward of each completion (batched: a reward model scores all of them in one pass)."""
        raise NotImplementedError

    def success(self, reward: float) -> bool:
        return reward >= 1.0

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[Observation, dict]:
        self._prompt, self._info = self.prompt(0 if seed is None else seed)
        return self._prompt, dict(self._info)

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict]:
        if self._prompt is None:
            raise RuntimeError("step() before reset()")
        r = float(self.score([self._prompt], [action], [self._info])[0])
        return "", r, True, False, {"success": self.success(r)}


def check_observation(obs: Any, where: str) -> list[Message]:
    """An observation as chat messages, or ValueError saying what was wrong."""
    if isinstance(obs, str):
        return [{"role": "user", "content": obs}] if obs else []
    if not isinstance(obs, list):
        raise TypeError(f"{where}: the observation must be a str or a list of chat messages, got "
                         f"{type(obs).__name__}")
    for m in obs:
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
            raise ValueError(f"{where}: a chat message must be {{'role': one of {ROLES}, 'content': str}}, "
                             f"got {m!r:.200}")
    return list(obs)


def check_step(out: Any, where: str) -> tuple[list[Message], float, bool, bool, dict]:
    """A step's result checked (5-tuple, finite reward, bool flags, dict info), or ValueError."""
    if not (isinstance(out, tuple) and len(out) == 5):
        raise ValueError(f"{where}: step() must return (observation, reward, terminated, truncated, info), "
                         f"got {out!r:.200}")
    obs, reward, terminated, truncated, info = out
    try:
        r = float(reward)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: reward must be a number, got {reward!r:.100}") from None
    if not math.isfinite(r):
        raise ValueError(f"{where}: reward is {r}")
    if not isinstance(info, dict):
        raise TypeError(f"{where}: info must be a dict, got {type(info).__name__}")
    return check_observation(obs, where), r, bool(terminated), bool(truncated), info
