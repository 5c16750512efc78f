"""Checkpoints: HF-format model + tokenizer, plus everything needed to resume exactly.

Layout of a run directory:

    run_dir/config.yaml                  effective config of the run
    run_dir/metrics.jsonl                one JSON line per logged step
    run_dir/checkpoints/step-000200/     model/ (save_pretrained), trainer_state.pt
    run_dir/final/                       the finished model in HF format (+ tokenizer)

A checkpoint is written to a temporary directory and renamed into place, so a crash mid-save never
leaves a half-written checkpoint that resume would pick up.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.utils import weights

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def checkpoint_step(ckpt: str | Path) -> int:
    """The step of a checkpoint directory (checkpoints/step-N)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt}: not a checkpoint directory (step-N)")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def is_hf_model(model: torch.nn.Module) -> bool:
    """A transformers model (LoRA adapters or not), which `save_model` / `load_weights_into` round-trip; other
    modules (e.g. a backbone with a scalar head) are checkpointed as state dicts."""
    from transformers import PreTrainedModel

    model = unwrap(model)
    return isinstance(model, PreTrainedModel) or is_peft(model)


def is_peft(model: torch.nn.Module) -> bool:
    """A peft model (LoRA adapters on a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_model(path: str | Path, model: torch.nn.Module, tokenizer: Any = None, merge_lora: bool = True) -> Path:
    """save_pretrained (safetensors) + tokenizer, atomically (tmp dir, then rename).

    A LoRA (peft) model is saved merged into a plain HF model by default, so what is saved loads anywhere
    (vLLM, from_pretrained) without peft; merge_lora=False saves the adapters only (for resuming).
    """
    import copy

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model = unwrap(model)
    if is_peft(model) and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()  # a copy: training goes on with the adapters
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def save_checkpoint(run_dir: str | Path, step: int, *, models: dict[str, torch.nn.Module],
                    tokenizer: Any = None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/step-N with each model (HF format) and a trainer_state.pt.

    `state` holds optimizer/scheduler state dicts, data position, counters...; RNG states are added here.
    """
    ck_root = Path(run_dir) / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step-{step:06d}"
    tmp = ck_root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, model in models.items():
        # Adapters only for LoRA models: resuming rebuilds the same frozen base and loads them back.
        save_model(tmp / name, model, tokenizer if name == "model" else None, merge_lora=False)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: str | Path, restore_rng: bool = True) -> dict[str, Any]:
    state = torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def load_weights_into(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load safetensors weights saved by save_pretrained into an existing (possibly wrapped) model."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    target = unwrap(model)
    weights.changed()  # caches of work from the old weights (replay records, prompt caches) are stale
    if (model_dir / "adapter_config.json").exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(target, sd)
        if result.unexpected_keys:
            raise RuntimeError(f"{model_dir}: adapter weights do not match the model "
                               f"(unexpected {result.unexpected_keys[:5]})")
        return
    missing, unexpected = target.load_state_dict(sd, strict=False)
    # Tied weights are saved once; anything else missing is a real mismatch.
    tied = set(getattr(target, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{model_dir}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
