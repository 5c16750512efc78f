"""Build a tiny Llama-architecture LM from scratch, or load any HF causal LM, with its tokenizer.

Everything is a plain `transformers` model, so checkpoints are HF format (safetensors + config.json +
tokenizer.json) and load in vLLM, PEFT, accelerate and DeepSpeed unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import ModelConfig, TokenizerConfig
from rlhfkit.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def d_ff_for(d_model: int) -> int:
    """Llama's MLP width: 8/3 * d, rounded up to a multiple of 64."""
    return int(math.ceil(8 * d_model / 3 / 64) * 64)


def tiny_llama_config(cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int | None,
                      pad_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff or d_ff_for(cfg.d_model),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        rms_norm_eps=1e-5, use_cache=True)


def build_model(cfg: ModelConfig, tokenizer: Any = None) -> torch.nn.Module:
    """A fresh model from `cfg` (needs the tokenizer for vocab size and special ids), or a loaded one."""
    if cfg.name_or_path:
        model = load_causal_lm(cfg.name_or_path, cfg.dtype)
    else:
        from transformers import LlamaForCausalLM

        if tokenizer is None:
            raise ConfigError("a from-scratch model needs a tokenizer (for its vocabulary size)")
        mcfg = tiny_llama_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                 tokenizer.pad_token_id)
        model = LlamaForCausalLM(mcfg).to(DTYPES[cfg.dtype])
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora_r:
        model = apply_lora(model, cfg)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each block's activations during backward instead of keeping them. Non-reentrant
    checkpoints: gradients then also reach LoRA adapters behind frozen embeddings, and the result equals
    the plain backward (tests/test_gradient_checkpointing.py)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model: torch.nn.Module, cfg: Any, causal_lm: bool = True) -> torch.nn.Module:
    """Wrap a model with LoRA adapters (peft); only the adapters train, the base weights are frozen.

    `cfg` has lora_r and lora_alpha (and optionally lora_dropout, lora_targets: ModelConfig, the reward
    model's config). causal_lm=False for a bare backbone (a critic's or reward model's, under a scalar head)."""
    from peft import LoraConfig, get_peft_model

    spec = getattr(cfg, "lora_targets", "all-linear")
    targets = spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=getattr(cfg, "lora_dropout", 0.0),
                      target_modules=targets, task_type="CAUSAL_LM" if causal_lm else None)
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # e.g. target module names that the model does not have
        raise ConfigError(f"model.lora_targets={spec!r}: {e}") from None


def load_causal_lm(path: str, dtype: str = "float32") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.zoo import resolve_model

    path = resolve_model(path)
    kw: dict[str, Any] = {"dtype": DTYPES[dtype]}
    p = Path(path)
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if p.suffix == ".gguf" or (ggufs and not (p / "config.json").exists()):
        # A GGUF file (e.g. the SmolLM2 wheel): transformers dequantises it into a normal model.
        gguf = p if p.suffix == ".gguf" else ggufs[0]
        path, kw["gguf_file"] = str(gguf.parent), gguf.name
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a causal LM from {path!r}: {e}") from None


def get_tokenizer(tcfg: TokenizerConfig, model_path: str = "", texts: Any = None):
    """The tokenizer to use: tcfg.path, else the model's own, else train one on `texts`."""
    from rlhfkit.data.tokenizer import load_tokenizer, train_tokenizer
    from rlhfkit.models.zoo import resolve_model

    if tcfg.path:
        return load_tokenizer(resolve_model(tcfg.path))
    if model_path:
        model_path = resolve_model(model_path)
        p = Path(model_path)
        if p.suffix == ".gguf" or (p.is_dir() and not (p / "tokenizer.json").exists()
                                   and not (p / "tokenizer_config.json").exists()):
            raise ConfigError(f"{model_path}: no tokenizer next to the model; set tokenizer.path")
        return load_tokenizer(model_path)
    if texts is None:
        raise ConfigError("no tokenizer: set tokenizer.path, or model.name_or_path to a model with one")
    return train_tokenizer(texts, tcfg.vocab_size, tcfg.min_frequency)


def count_params(model: torch.nn.Module, frozen_only: bool = False) -> int:
    """Parameters counted once (tied embedding/head weights are shared); only the frozen ones (no
    requires_grad, e.g. LoRA's base weights) with frozen_only."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
               if not (frozen_only and p.requires_grad))


def decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not norms, biases or embeddings (as in GPT-2/Llama recipes)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model_or_groups: torch.nn.Module | list, ocfg: Any) -> torch.optim.Optimizer:
    """AdamW over a model (decay groups as above) or given param groups, fused where torch supports it:
    one kernel per step instead of foreach's passes over every tensor (measured ~5x faster on CPU, e.g.
    0.21 s vs 1.13 s per step for the 4.3M-parameter tiny model on a busy 2-core machine)."""
    groups = (decay_param_groups(model_or_groups, ocfg.weight_decay)
              if isinstance(model_or_groups, torch.nn.Module) else model_or_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, fused=fused)


def lr_lambda(ocfg: Any):
    """Warm-up then cosine/linear decay to min_lr_ratio (as a multiplier of lr), or constant."""
    warm, total, floor = ocfg.warmup_steps, ocfg.max_steps, ocfg.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if ocfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if ocfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
