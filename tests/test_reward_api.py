"""The one reward interface: built-in rules, user callables, clear errors."""
from __future__ import annotations

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models.reward import load_reward, vowel_fraction


def test_vowel_rule_by_hand():
    # "aab!" -> letters a,a,b -> 2/3 vowels; no letters -> 0; non-ASCII letters ignored.
    assert vowel_fraction(["", "", ""], ["aab!", "123", "éa"]) == [pytest.approx(2 / 3), 0.0, 1.0]
    r = load_reward("rule:vowels")
    out = r(["p", "q"], ["AEIOU", "xyz"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0]


def test_user_callable_and_errors():
    r = load_reward("rule:tests.test_reward_api:_shouting")
    assert r(["x"], ["HI!"]).tolist() == [1.0]
    with pytest.raises(ConfigError, match="unknown built-in rule"):
        load_reward("rule:nope")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("rule:no.such.module:fn")
    with pytest.raises(ConfigError, match="no reward model there"):
        load_reward("/nonexistent/dir")
    bad = load_reward("rule:tests.test_reward_api:_wrong_length")
    with pytest.raises(ValueError, match="returned shape"):
        bad(["a", "b"], ["x", "y"])


def _shouting(prompts, completions):
    return [float(c.isupper()) for c in completions]


def _wrong_length(prompts, completions):
    return [0.0]
