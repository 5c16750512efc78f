"""Independent judges: scorers that no reward model was trained to imitate.

The VADER lexicon judge (Hutto & Gilbert 2014) scores sentiment with a rule-based lexicon of 7.5K words
rated by humans; a text counts as positive when its compound score is >= 0.05 (the authors' threshold).
It is a different instrument from our learned reward models, so a policy that games the reward model
does not automatically fool it.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

POSITIVE_THRESHOLD = 0.05


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1] per text."""
    a = _analyzer()
    return [a.polarity_scores(t)["compound"] for t in texts]


def vader_positive(texts: Sequence[str]) -> list[bool]:
    return [c >= POSITIVE_THRESHOLD for c in vader_compound(texts)]


def vader_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The judge as a rule reward (rule:rlhfkit.eval.judges:vader_reward): compound of the completion."""
    return vader_compound(completions)
