"""Simulated labelers: automatic annotators that pull tasks and answer them like a person would.

    vader-rater     a simulated person whose sense of each word's sentiment is one of the 10 real human
                    ratings of that word in the VADER lexicon (drawn once per rater), run through VADER's
                    rules (negation, boosters, "but", caps). Different seeds are different people, so they
                    disagree the way people do; it rates, ranks and picks by sentiment.
    reward-model    scores with any reward (rlhfkit.models.reward.load_reward: rule:..., or a trained
                    reward model directory) and answers deterministically from the scores.
    bradley-terry   the same scores with Bradley-Terry noise at a temperature T: picks A over B with
                    probability sigmoid((r_A - r_B) / T), ranks by Plackett-Luce (Gumbel-perturbed
                    scores), rates r + T * logistic noise. T -> 0 is the reward-model labeler.

Labelers cannot edit, so they answer rate, rank and pair tasks; edit tasks are left for people.
`run_labeler` makes a labeler work through a round exactly as a human client would (same store calls).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.store import KINDS, Store, Task

LABELERS = ("vader-rater", "reward-model", "bradley-terry")
SENTIMENT_REWARD = "rule:rlhfkit.feedback.labelers:vader_compound"


class Labeler:
    """Answers tasks from a utility score per completion (higher = better)."""

    name = "labeler"
    kinds: tuple[str, ...] = ("rate", "rank", "pair")

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self._cache: dict[tuple[str, str], float] = {}
        self.range: tuple[float, float] | None = None      # utility values mapped to the scale ends

    # -- to override ---------------------------------------------------------------------------------
    def utility(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def noisy(self, u: float) -> float:
        """The utility as perceived for one answer (no noise by default)."""
        return u

    # -- shared --------------------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[str], completions: Sequence[str]) -> None:
        """Score many completions at once (batched). The first call also fixes the utility range that
        ratings map onto the scale: the 5th..95th percentile of these scores (so call it with the whole
        round, as run_labeler does)."""
        self._score_all(prompts, completions)
        if self.range is None and completions:
            vals = sorted(self._cache[(p, c)] for p, c in zip(prompts, completions))
            lo, hi = vals[int(0.05 * (len(vals) - 1))], vals[int(0.95 * (len(vals) - 1))]
            self.range = (lo, hi) if hi > lo else (lo - 1.0, lo + 1.0)

    def _score_all(self, prompts: Sequence[str], completions: Sequence[str]) -> None:
        todo = list(dict.fromkeys((p, c) for p, c in zip(prompts, completions) if (p, c) not in self._cache))
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            for key, u in zip(chunk, self.utility([p for p, _ in chunk], [c for _, c in chunk])):
                self._cache[key] = float(u)

    def score(self, prompt: str, completion: str) -> float:
        if (prompt, completion) not in self._cache:
            self._score_all([prompt], [completion])
        return self._cache[(prompt, completion)]

    def to_scale(self, u: float, scale: tuple[int, int]) -> int:
        lo, hi = self.range or (-1.0, 1.0)      # without prepare(): assume scores in [-1, 1]
        x = (u - lo) / (hi - lo)
        return int(min(scale[1], max(scale[0], round(scale[0] + x * (scale[1] - scale[0])))))

    def answer(self, task: Task) -> dict:
        """The answer payload for a task (as a client would POST it)."""
        ids = [s["id"] for s in task.samples]
        u = [self.noisy(self.score(task.prompt, s["text"])) for s in task.samples]
        out: dict = {"kind": task.kind, "submission_id": task.submission_id}
        if task.kind == "rate":
            out["rating"] = self.to_scale(u[0], task.scale)
        elif task.kind == "rank":
            # Best first; exact ties in random order.
            order = sorted(range(len(ids)), key=lambda j: (-u[j], self.rng.random()))
            out["order"] = [ids[j] for j in order]
        elif task.kind == "pair":
            if u[0] == u[1]:
                out.update(chosen=None, tie=True)
            else:
                out["chosen"] = ids[0] if u[0] > u[1] else ids[1]
        else:
            raise ValueError(f"{self.name} cannot answer {task.kind} tasks")
        return out


class VaderRater(Labeler):
    """A simulated person: each lexicon word's valence is one of its 10 real human ratings."""

    name = "vader-rater"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        from rlhfkit.data.sources import vader_lexicon

        self.analyzer = SentimentIntensityAnalyzer()
        rng = random.Random(f"vader-rater/{seed}")
        # Keep VADER's own words (its rules look some up); swap in this person's valences.
        personal = {w: float(rng.choice(ratings)) for w, (_, ratings) in sorted(vader_lexicon().items())}
        self.analyzer.lexicon = {**self.analyzer.lexicon, **personal}
        self.range = (-1.0, 1.0)                            # VADER's compound score lives in [-1, 1]

    def utility(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.analyzer.polarity_scores(c)["compound"] for c in completions]


class RewardModelLabeler(Labeler):
    """Answers from a reward's scores (a rule or a trained reward model), deterministically."""

    name = "reward-model"

    def __init__(self, reward: str, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed)
        from rlhfkit.models.reward import load_reward

        self.reward_spec = reward
        self.reward = load_reward(reward, device)

    def utility(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.reward(list(prompts), list(completions)).tolist()


class BradleyTerryLabeler(RewardModelLabeler):
    """Reward scores plus Bradley-Terry / Plackett-Luce noise at a temperature."""

    name = "bradley-terry"

    def __init__(self, reward: str, temperature: float = 1.0, seed: int = 0, device: str = "cpu") -> None:
        if temperature < 0:
            raise ConfigError(f"temperature={temperature} must be >= 0")
        super().__init__(reward, seed, device)
        self.temperature = temperature

    def noisy(self, u: float) -> float:
        # r + T * Gumbel: argmax over a pair gives P(A) = sigmoid((r_A - r_B) / T) (the difference of two
        # Gumbels is logistic), and sorting gives a Plackett-Luce ranking with logits r / T.
        if self.temperature == 0:
            return u
        g = -math.log(-math.log(max(self.rng.random(), 1e-300)))
        return u + self.temperature * g

    def answer(self, task: Task) -> dict:
        if task.kind == "rate":
            # A rating sees logistic noise (difference of two Gumbels) around the true score.
            u = self.score(task.prompt, task.samples[0]["text"])
            if self.temperature:
                p = min(max(self.rng.random(), 1e-12), 1 - 1e-12)
                u += self.temperature * math.log(p / (1 - p))
            return {"kind": "rate", "submission_id": task.submission_id,
                    "rating": self.to_scale(u, task.scale)}
        return super().answer(task)


def vader_compound(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER's compound sentiment of each completion in [-1, 1] (the standard lexicon): a reward
    usable as rule:rlhfkit.feedback.labelers:vader_compound (the eval judge, rlhfkit.eval.judges)."""
    from rlhfkit.eval.judges import vader_reward

    return vader_reward(prompts, completions)


def make_labeler(kind: str, *, reward: str = SENTIMENT_REWARD, temperature: float = 1.0, seed: int = 0,
                 device: str = "cpu") -> Labeler:
    if kind == "vader-rater":
        return VaderRater(seed)
    if kind == "reward-model":
        return RewardModelLabeler(reward, seed, device)
    if kind == "bradley-terry":
        return BradleyTerryLabeler(reward, temperature, seed, device)
    raise ConfigError(f"unknown labeler {kind!r}; choose from {', '.join(LABELERS)}")


def run_labeler(store: Store, labeler: Labeler, *, project: str, round: int | None = None,
                name: str | None = None, limit: int = 0, progress: bool = False) -> int:
    """Let a labeler answer a project's tasks (of one round, or of every open round) as annotator
    `name` (created if new) until none is left or `limit` answers were given. Returns how many."""
    name = name or f"{labeler.name}-{labeler.seed}"
    aid = store.add_annotator(name, kind="labeler", exist_ok=True)
    # Score the texts in batches first (one reward call per 256 texts, not one per task); this also
    # fixes how the labeler's scores map onto the rating scale.
    from rlhfkit.feedback.export import round_samples

    pairs = round_samples(store, project, round)
    labeler.prepare([p for p, _ in pairs], [c for _, c in pairs])
    kinds = tuple(k for k in labeler.kinds if k in KINDS)
    done = 0
    while not limit or done < limit:
        task = store.next_task(aid, project=project, round=round, kinds=kinds)
        if task is None:
            break
        store.submit(aid, task.item_id, labeler.answer(task))
        done += 1
        if progress and done % 200 == 0:
            print(f"{name}: {done} answers", flush=True)
    return done
