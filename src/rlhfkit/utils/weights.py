"""When weights change: an explicit generation the training code owns.

Work computed from a model's weights and kept for later (a rollout's record of its sampling forward, which
replay reuses as the first training forward; a frozen reference's prompt cache) is valid only while those
weights are unchanged. Such a cache stores `stamp(model)` when it is made and is used only while
`stamp(model)` still returns the same value. The stamp moves on at:
  * every optimizer step, of any torch optimizer (fused or not, Adam, AdamW, SGD, a user's own), through
    torch's global optimizer step hook, for every model that has trainable parameters;
  * every other write of weights: a checkpoint or adapter load, a LoRA merge, a broadcast from rank 0
    (`changed()`, called where rlhfkit does these), for every model.

Parameters' `_version` counters are deliberately not used: torch's fused Adam/AdamW update parameters in
place without bumping them, so a cache keyed on them survives an optimizer step unnoticed.

Conservative by design: any optimizer step invalidates every trainable model's caches, and any load every
model's. A frozen model (no parameter requires grad, e.g. the reference) keeps its caches across the
policy's optimizer steps.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_state = {"steps": 0, "writes": 0, "hooked": False}


def _count_step(optimizer, args, kwargs) -> None:
    _state["steps"] += 1


def _hook() -> None:
    if not _state["hooked"]:
        register_optimizer_step_post_hook(_count_step)
        _state["hooked"] = True


def changed() -> None:
    """Weights were written outside an optimizer step (load, merge, broadcast): every stamp moves on."""
    _state["writes"] += 1


def stamp(model: torch.nn.Module) -> tuple[int, ...]:
    """The weights generation of `model`: equal stamps mean no optimizer step (if it trains) and no write
    of weights happened in between."""
    _hook()
    if any(p.requires_grad for p in model.parameters()):
        return _state["writes"], _state["steps"]
    return (_state["writes"],)


_hook()
