"""Sampling a LoRA policy with our decoders: a merged copy of the model.

A peft model's forward adds each adapter's low-rank path beside every frozen linear layer, through peft's
Python wrappers, which our decoders do not read. For sampling (no gradients, eval mode) the policy equals a
plain model whose linear weights are W + scale * B @ A, so `merged(model)` keeps such a copy (built once
with peft's merge_and_unload on a deep copy, then refreshed in place whenever `utils/weights.py`'s stamp of
the policy moves on: after each optimizer step, load or merge) and our decoder samples from it. The
log-probabilities of training are still the policy's own forward, so gradients never go through the copy.

What it costs: a second set of the model's weights (540 MB for SmolLM2-135M in float32) and, per
rollout after an update, one B @ A product and one weight copy per adapted layer. What it computes: the
same function as peft's forward to float rounding (x W^T + s (x A^T) B^T against x (W + s B A)^T), tested
token for token in tests/test_accel_lora.py.

Only the plain case is taken: one active LoRA adapter, adapters enabled and unmerged, no DoRA, a base
model one of our decoders reads; anything else samples through peft's forward as before.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from rlhfkit.utils import weights
from rlhfkit.utils.checkpoint import is_peft

_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> (stamp, merged copy)


def _lora_layers(model: Any) -> list[tuple[str, Any]] | None:
    """(name in the base model, peft LoRA layer) for every adapted layer, or None if the model is not a plain
    single-adapter LoRA model now (adapters off, merged, several adapters, DoRA)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        return None
    for _, m in layers:
        active = m.active_adapters
        if (m.disable_adapters or m.merged or len(active) != 1 or m.use_dora.get(active[0], False)
                or active[0] not in m.lora_A):
            return None
    return layers


def merged(model: Any) -> torch.nn.Module | None:
    """A plain model equal to the LoRA `model` as it is now, for sampling; None if `model` is not a LoRA
    model whose base our decoders read (see the module docstring)."""
    from rlhfkit.accel import fastdecode

    if not is_peft(model) or not fastdecode.supported(model.get_base_model()):
        return None
    layers = _lora_layers(model)
    if layers is None:
        return None
    now = weights.stamp(model)
    kept = _COPIES.get(model)
    if kept is not None and kept[0] == now:
        return kept[1]
    with torch.no_grad():
        if kept is None:
            copy_ = copy.deepcopy(model).merge_and_unload()
            copy_.requires_grad_(False)
        else:
            copy_ = kept[1]
            # Every base weight as it is now (a load may have written frozen ones too), then the adapters.
            params = dict(copy_.named_parameters())
            for n, p in model.get_base_model().named_parameters():
                if "lora_" not in n:
                    params[n.replace(".base_layer", "")].copy_(p)
            for name, layer in layers:
                target = copy_.get_submodule(name)
                target.weight.add_(layer.get_delta_weight(layer.active_adapters[0]).to(target.weight.dtype))
    copy_.eval()
    _COPIES[model] = (weights.stamp(model), copy_)
    return copy_
