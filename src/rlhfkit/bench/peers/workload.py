"""The peer workload, defined once and read by both sides.

This module imports only the standard library at import time, so TRL's worker (another virtualenv, with
this source directory on its path) and ours import the same settings and the same reward functions:

    rule_reward    sentiment words in the completion (a lexicon rule, pure Python)
    minilm_reward  a MiniLM sentence encoder with a fixed random linear head: the cost of a real reward
                   model forward per completion, scored identically on both sides

Both take (prompts, completions, **kwargs) and accept TRL's conversational completions (a list of
messages) as well as plain strings. The time spent inside them is added to REWARD_SECONDS, so either side
can split the reward out of its rollout time.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRAINERS = ("grpo", "rloo")
REWARDS = ("rule", "minilm")
# The KL weight of each trainer: TRL's defaults, set explicitly on both sides.
KL_COEF = {"grpo": 0.0, "rloo": 0.05}
MINILM_ENV = "RLHFKIT_PEERS_MINILM"  # the MiniLM directory, for minilm_reward in a worker process


@dataclass
class Workload:
    """Settings a user would pick on a laptop: 8 prompts x 4 completions x 64 new tokens per step."""
    model: str                      # local HF directory of the policy (and its tokenizer)
    trainer: str                    # grpo | rloo
    reward: str                     # rule | minilm
    lora_r: int = 0                 # 0 = full fine-tuning
    lora_alpha: float = 32.0
    steps: int = 10                 # timed steps, after warmup_steps
    warmup_steps: int = 1
    prompts_per_step: int = 8
    completions_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    lr: float = 1e-5                # AdamW, constant, betas (0.9, 0.999), eps 1e-8, no weight decay
    grad_clip: float = 1.0
    kl_coef: float = 0.0
    prompt_words: int = 24          # each prompt: the first words of a VADER movie-review snippet
    threads: int = 0                # torch threads per worker; 0 = torch's default
    seed: int = 0
    minilm: str = ""                # MiniLM directory (reward minilm)
    prompts_file: str = ""          # JSON lines {"prompt": ...}, one per prompt (user turn of the chat template)

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.completions_per_prompt

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        return cls(**json.loads(Path(path).read_text()))


def prompt_texts(snippets: list[str], n: int, words: int) -> list[str]:
    """n user turns asking for a continuation of the first `words` words of each snippet (deduplicated,
    in order)."""
    out, seen = [], set()
    for s in snippets:
        head = " ".join(s.split()[:words])
        if len(head.split()) >= 4 and head not in seen:
            seen.add(head)
            out.append(f"Continue this movie review in one or two sentences: {head}")
        if len(out) == n:
            break
    return out


def write_prompts(texts: list[str], path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")


def read_prompts(path: str | Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------------------------------------------
# Rewards (both sides call these very functions)
# ---------------------------------------------------------------------------------------------------
REWARD_SECONDS = [0.0]

POSITIVE = frozenset({"good", "great", "excellent", "wonderful", "brilliant", "superb", "fine", "fun",
    "funny", "enjoyable", "enjoyed", "love", "loved", "lovely", "beautiful", "best", "moving", "charming",
    "clever", "delightful", "fascinating", "fresh", "gripping", "powerful", "remarkable", "smart", "solid",
    "strong", "sweet", "touching", "entertaining", "engaging", "witty", "warm", "perfect", "masterpiece",
    "amazing"})
NEGATIVE = frozenset({"bad", "awful", "terrible", "boring", "dull", "poor", "worst", "weak", "mess", "messy",
    "stupid", "silly", "tedious", "predictable", "flat", "bland", "lame", "annoying", "disappointing",
    "disappointed", "waste", "hate", "hated", "ugly", "slow", "tired"})
_WORD = re.compile(r"[a-z']+")


def completion_text(c: Any) -> str:
    """A completion as text: TRL passes conversational completions as [{"role", "content"}, ...]."""
    if isinstance(c, str):
        return c
    return "".join(m.get("content", "") for m in c)


def rule_score(text: str) -> float:
    """(positive - negative words) / sqrt(words + 1): rewards praise, not length."""
    words = _WORD.findall(text.lower())
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    return (pos - neg) / math.sqrt(len(words) + 1)


def rule_reward(prompts: Any, completions: Any, **_: Any) -> list[float]:
    t = time.perf_counter()
    out = [rule_score(completion_text(c)) for c in completions]
    REWARD_SECONDS[0] += time.perf_counter() - t
    return out


_MINILM: dict[str, Any] = {}


def _minilm() -> dict[str, Any]:
    if not _MINILM:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = os.environ.get(MINILM_ENV, "")
        if not path:
            raise RuntimeError(f"minilm_reward needs ${MINILM_ENV}: the MiniLM model directory")
        enc = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)  # the head: a fixed random unit direction, same on both sides
        w = torch.randn(enc.config.hidden_size, generator=g)
        _MINILM.update(tok=AutoTokenizer.from_pretrained(path), enc=enc, w=w / w.norm())
    return _MINILM


def minilm_reward(prompts: Any, completions: Any, **_: Any) -> list[float]:
    import torch

    t = time.perf_counter()
    m = _minilm()
    texts = [completion_text(c) for c in completions]
    with torch.no_grad():
        x = m["tok"](texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = m["enc"](**x).last_hidden_state                              # (B, T, H)
        mask = x["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)          # mean over real tokens
        out = (pooled @ m["w"]).tolist()
    REWARD_SECONDS[0] += time.perf_counter() - t
    return out


REWARD_FNS = {"rule": "rule_reward", "minilm": "minilm_reward"}


def reward_fn(name: str):
    return globals()[REWARD_FNS[name]]
