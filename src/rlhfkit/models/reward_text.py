"""How a reward model turns (prompt, completion) into tokens: one rule for training, evaluation, RL scoring
and the labelers.

A reward model judges the completion, so when prompt + completion is longer than `max_len` tokens the
text is cut where it hurts least:

    left   (default) the completion is kept whole (its first max_len tokens if it alone is longer) and
           the prompt is cut from the left: the model sees the end of the dialogue and the whole reply;
    right  the joined text is cut from the right (the completion goes first: a long prompt leaves
           nothing of it, and two replies to the same prompt become the same text);
    error  a text longer than max_len is an error.

The joined text is tokenised once, exactly as without truncation (a text that fits gets the very tokens
it always got), and the prompt / completion boundary is read from the tokens' character offsets; a token
that straddles the boundary counts as prompt. The tokenizer's own special tokens ([CLS] ... [SEP], BOS)
are kept around the kept tokens and count towards max_len.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.errors import DataError

TRUNCATION_SIDES = ("left", "right", "error")


@dataclass
class CutStats:
    """What truncation did to a set of texts."""

    texts: int = 0
    cut: int = 0                 # texts longer than max_len
    prompt_cut: int = 0          # ... of which only the prompt lost tokens
    completion_cut: int = 0      # ... of which the completion lost tokens
    longest: int = 0             # tokens of the longest text before cutting

    def add(self, other: CutStats) -> None:
        self.texts += other.texts
        self.cut += other.cut
        self.prompt_cut += other.prompt_cut
        self.completion_cut += other.completion_cut
        self.longest = max(self.longest, other.longest)


class TextTokenizer:
    """Tokenise (prompt, completion) pairs for a reward model with a truncation rule (module docstring)."""

    def __init__(self, tokenizer: Any, max_len: int, truncation: str = "left") -> None:
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"truncation {truncation!r}: expected one of {', '.join(TRUNCATION_SIDES)}")
        self.tokenizer, self.max_len, self.truncation = tokenizer, int(max_len), truncation
        self.stats = CutStats()  # running totals over every call (for warnings at the end of a pass)

    def ids(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt + completion, cut to max_len by the rule (special tokens included)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        tok = self.tokenizer
        texts = [p + c for p, c in zip(prompts, completions)]
        fast = getattr(tok, "is_fast", False)
        enc = tok(texts, add_special_tokens=True, truncation=False, return_special_tokens_mask=True,
                  return_offsets_mapping=fast, verbose=False)
        out, st = [], CutStats(texts=len(texts))
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids, special = enc["input_ids"][i], enc["special_tokens_mask"][i]
            content = [k for k, s in enumerate(special) if not s]
            if len(ids) <= self.max_len:
                out.append(list(ids))
                continue
            st.cut += 1
            st.longest = max(st.longest, len(ids))
            if self.truncation == "error":
                raise DataError(f"a text of {len(ids)} tokens is longer than model.max_len={self.max_len} "
                                f"(model.truncation error): {(p + c)[:80]!r}...")
            head = ids[:content[0]] if content else ids
            tail = ids[content[-1] + 1:] if content else []
            budget = self.max_len - len(head) - len(tail)
            body = [ids[k] for k in content]
            if self.truncation == "right":  # the end of the joined text is the completion's
                kept = body[:budget]
                st.completion_cut += 1
            else:
                n_prompt = _prompt_tokens(tok, enc, i, content, p, fast)
                comp = body[n_prompt:]
                keep_c = comp[:budget]
                room = budget - len(keep_c)
                kept = (body[n_prompt - room:n_prompt] if room > 0 else []) + keep_c
                if len(keep_c) < len(comp):
                    st.completion_cut += 1
                else:
                    st.prompt_cut += 1
            out.append(list(head) + kept + list(tail))
        self.stats.add(st)
        return out

    def batch(self, prompts: Sequence[str], completions: Sequence[str],
              device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, T), padded on the right to the longest kept text."""
        return self.pad(self.ids(prompts, completions), device)

    def pad(self, rows: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Token id rows (from ids) -> input_ids and attention_mask (B, T), padded on the right."""
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def take_stats(self) -> CutStats:
        """The totals since the last call, and reset them."""
        st, self.stats = self.stats, CutStats()
        return st


def _prompt_tokens(tok: Any, enc: Any, i: int, content: list[int], prompt: str, fast: bool) -> int:
    """How many of the content tokens belong to the prompt (a token that starts inside it does)."""
    if not prompt:
        return 0
    if fast:
        offsets = enc["offset_mapping"][i]
        return sum(1 for k in content if offsets[k][0] < len(prompt))
    # Slow tokenizers give no offsets: the prompt tokenised alone (exact at a word boundary).
    return min(len(tok(prompt, add_special_tokens=False)["input_ids"]), len(content))


def cut_message(st: CutStats, max_len: int, truncation: str, what: str = "texts") -> str:
    """A one-line account of a pass's truncation, or '' when nothing was cut."""
    if not st.cut:
        return ""
    how = {"left": f"the prompt cut from the left, the completion kept whole ({st.prompt_cut}) or cut to "
                   f"its first tokens when alone too long ({st.completion_cut})",
           "right": "cut from the right, completion first",
           "error": ""}[truncation]
    return (f"{st.cut} of {st.texts} {what} ({100 * st.cut / max(st.texts, 1):.1f}%) are longer than "
            f"model.max_len={max_len} tokens (longest {st.longest}): {how}")
