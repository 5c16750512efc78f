"""Reasoning tasks with verifiable answers from reasoning-gym (procedural generators + their own scorers),
as single-turn environments.

    env = make("reasoning", task="chain_sum", size=1000)          # split=train: problems 0..size-1
    env = make("reasoning", task="chain_sum", split="test")        # held-out: another seed, no train question

The prompt is the generator's question plus an instruction to end with "Answer: <answer>"; the answer is
pulled out of the model's text (extract_answer) and scored by the task's own `score_answer` (1.0 right,
0 wrong; some tasks give partial credit). Needs the reasoning-gym package (pip install 'rlhfkit[envs]').
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from rlhfkit.envs.base import SingleTurnEnv
from rlhfkit.errors import ConfigError

INSTRUCTION = "Think briefly, then give your final answer on the last line as: Answer: <answer>"
TEST_SEED = 1_000_003  # the held-out split's generator seed (train uses `seed`)

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LABELLED = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer in a model's chat output: <answer>x</answer>, then \\boxed{x}, then the last
    "Answer: x" line, then the last number; None if there is none of those."""
    for pattern in (_TAGGED, _BOXED):
        hits = pattern.findall(text)
        if hits:
            return hits[-1].strip()
    labelled = [m.group(1).strip() for line in text.splitlines() if (m := _LABELLED.search(line))]
    if labelled and labelled[-1]:
        return labelled[-1].rstrip(".").strip()
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


class ReasoningEnv(SingleTurnEnv):
    def __init__(self, task: str = "chain_sum", size: int = 1000, split: str = "train", seed: int = 0,
                 task_kwargs: dict | None = None, instruction: str = INSTRUCTION) -> None:
        super().__init__()
        try:
            import reasoning_gym
        except ImportError:
            raise ConfigError("the reasoning environment needs reasoning-gym: pip install 'rlhfkit[envs]'") from None
        if split not in ("train", "test"):
            raise ConfigError(f"reasoning: split must be train or test, got {split!r}")
        if size < 1:
            raise ConfigError(f"reasoning: size={size} must be >= 1")
        kw = dict(task_kwargs or {})
        try:
            train = reasoning_gym.create_dataset(task, size=size, seed=seed, **kw)
        except Exception as e:  # noqa: BLE001 - unknown task name or bad generator settings
            raise ConfigError(f"reasoning: cannot build task {task!r} with {kw} ({type(e).__name__}: {e})") from None
        self.task, self.split, self.instruction = task, split, instruction
        self.dataset = train
        self.items = [train[i] for i in range(size)]
        if split == "test":  # another stream of problems, minus any question the train split also has
            seen = {x["question"] for x in self.items}
            test = reasoning_gym.create_dataset(task, size=size, seed=seed + TEST_SEED, **kw)
            self.dataset = test
            self.items = [x for x in (test[i] for i in range(size)) if x["question"] not in seen]
            if not self.items:
                raise ConfigError(f"reasoning: task {task!r} has no test question unseen in training")

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, seed: int) -> tuple[str, dict]:
        item = self.items[seed % len(self.items)]
        return f"{item['question'].strip()}\n{self.instruction}", {"item": item}

    def score(self, prompts: Sequence[str], completions: Sequence[str], infos: Sequence[dict]) -> list[float]:
        out = []
        for text, info in zip(completions, infos):
            answer = extract_answer(text)
            try:
                out.append(float(self.dataset.score_answer(answer, info["item"])) if answer is not None else 0.0)
            except Exception:  # noqa: BLE001 - a scorer that chokes on a malformed answer: that answer is wrong
                out.append(0.0)
        return out
