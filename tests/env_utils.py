"""Helpers for the environment tests: a word-level tokenizer small enough that a random 2-layer policy
says numbers often (so it can learn the guessing game in seconds), and environments that misbehave."""
from __future__ import annotations

import time

from rlhfkit.envs.base import Env

WORDS = ["<eos>", "<pad>", "1", "2", "3", "4", "guess", "my", "number", "from", "to", "higher", "lower",
         "a", "please", ".", ",", "the", "cat", "sun", "red", "is", "and", "no", "yes", "it"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", bos_token="<eos>")


class Broken(Env):
    """Multi-turn; step() misbehaves as told on turn `at` (raise, malformed, hang), else says 'lower'."""

    max_turns = 3

    def __init__(self, how: str = "raise", at: int = 1) -> None:
        self.how, self.at, self.turn = how, at, 0

    def reset(self, seed=None, options=None):
        self.turn = 0
        return "guess my number", {}

    def step(self, action):
        self.turn += 1
        if self.turn == self.at:
            if self.how == "raise":
                raise KeyError("boom")
            if self.how == "malformed":
                return "lower", 1.0, False
            if self.how == "nan":
                return "lower", float("nan"), False, False, {}
            if self.how == "hang":
                time.sleep(30)
        return "lower", 0.5, False, False, {}
