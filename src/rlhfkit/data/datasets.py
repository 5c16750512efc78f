"""Turning texts and pairs into training tensors, and a resumable data order.

The data order is a pure function of (seed, position): epoch e visits the items in a permutation seeded
by (seed, e), and a run's position is one integer (items consumed so far, over all processes). Resuming
from a checkpoint, on any number of processes, continues with exactly the items that come next.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class EpochSampler:
    """Indices of a global data order: a fresh seeded permutation of range(n) per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed = n, seed
        self._cache: tuple[int, np.ndarray, int] | None = None

    def epoch(self, e: int) -> tuple[np.ndarray, int]:
        """(permutation, integer offset in [0, 2^31)) of epoch e; the offset lets users vary more."""
        if self._cache is None or self._cache[0] != e:
            rng = np.random.default_rng([self.seed, e])
            self._cache = (e, rng.permutation(self.n), int(rng.integers(0, 2**31)))
        return self._cache[1], self._cache[2]

    def indices(self, pos: int, size: int) -> list[tuple[int, int]]:
        """(epoch, item index) for global positions pos .. pos+size-1."""
        out = []
        for p in range(pos, pos + size):
            e, i = divmod(p, self.n)
            out.append((e, int(self.epoch(e)[0][i])))
        return out


# ---------------------------------------------------------------------------------------------------
# Prompt/response pairs for SFT
# ---------------------------------------------------------------------------------------------------
def encode_pair(tok: Any, prompt: str, response: str, template: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS and the number of leading prompt tokens (no loss there).

    plain: BOS? prompt response EOS, the two encoded separately so the boundary is exact (put any
    separator you want into your data). chat: the tokenizer's chat template for one user turn with the
    generation prompt, then the response and EOS.
    Too long: the prompt loses tokens from its start first (its end matters most), then the response
    loses its end.
    """
    if template == "chat":
        p_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
        if isinstance(p_ids, dict) or hasattr(p_ids, "keys"):
            p_ids = p_ids["input_ids"]
        p_ids = list(p_ids)
    else:
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(p_ids) + len(r_ids) > max_len:
        keep_p = max(1, max_len - len(r_ids))
        p_ids = p_ids[-keep_p:]
        r_ids = r_ids[:max_len - len(p_ids)]
    return p_ids + r_ids, len(p_ids)


def collate_sft(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Returns input_ids (B, T-1), labels (B, T-1) = next tokens, and
    loss_mask (B, T-1) = 1 where the label is a response token (or the final EOS)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    target = torch.zeros((len(examples), T), dtype=torch.float32)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for b, (x, n_prompt) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x)
        attn[b, :len(x)] = 1
        target[b, n_prompt:len(x)] = 1.0
    return {"input_ids": ids[:, :-1], "attention_mask": attn[:, :-1], "labels": ids[:, 1:],
            "loss_mask": target[:, 1:]}
