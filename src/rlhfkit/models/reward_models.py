"""Trained reward models behind the one reward interface of rlhfkit.models.reward.

    linear  r(x, y) = w^T standardize(phi(x + y)) + b, phi a frozen Encoder (MiniLM or our LM)
    deep    a transformer backbone + scalar head (ScalarHeadModel), pooled over the text

Both score the text prompt + completion exactly as the policy produced it (a completion continues its
prompt; a free-standing snippet has an empty prompt), cut to max_len tokens by one rule
(rlhfkit.models.reward_text: by default the prompt loses tokens from the left and the completion is kept
whole), and return rewards normalised to mean 0 / std 1 on
the reference set recorded at training time. A saved model is a directory:

    reward_config.json     kind, normalisation, how it was trained, its evaluation metrics
    linear.safetensors     (linear) w, b and the feature mean/std used to standardise phi
    encoder/               (linear on our own LM) a copy of that LM, so the directory stands alone
    backbone/, scalar_head.safetensors, tokenizer files   (deep)

`preference_scale` in reward_config.json turns two normalised rewards into a Bradley-Terry preference:
P(a over b) = sigmoid(preference_scale * (r_a - r_b)), fitted on held-out rated pairs; the simulated
labelers use it.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models.embeddings import MINILM, Encoder, unique_rows
from rlhfkit.models.heads import ScalarHeadModel, last_token_index
from rlhfkit.models.ops import masked_mean
from rlhfkit.models.reward import RewardFunction
from rlhfkit.models.reward_text import TextTokenizer

CONFIG_FILE = "reward_config.json"
CAUSAL_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def join_text(prompt: str, completion: str) -> str:
    """The text a reward model scores: the completion continues its prompt, as generated."""
    return prompt + completion


class TextRewardModel(RewardFunction):
    """A reward model scoring joined texts; raw scores are normalised with a stored mean/std."""

    kind = ""

    def __init__(self, norm_mean: float = 0.0, norm_std: float = 1.0, info: dict | None = None) -> None:
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)
        self.info = dict(info or {})
        self.name = self.info.get("name", self.kind)

    truncation = "left"

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Unnormalised scores of prompt + completion: (N,) float32 on the CPU."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return (self.raw_scores(prompts, completions) - self.norm_mean) / self.norm_std

    def write_config(self, path: Path, extra: dict[str, Any]) -> None:
        cfg = {"kind": self.kind, "format_version": 1,
               "normalization": {"mean": self.norm_mean, "std": self.norm_std},
               "text": "prompt + completion, concatenated as generated", "truncation": self.truncation,
               **self.info, **extra}
        (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))


# --------------------------------------------------------------------------------------------------
# Linear on frozen features
# --------------------------------------------------------------------------------------------------
class LinearRewardModel(TextRewardModel):
    kind = "linear"

    def __init__(self, encoder: Encoder, w: torch.Tensor, b: float, feat_mean: torch.Tensor,
                 feat_std: torch.Tensor, **kw: Any) -> None:
        super().__init__(**kw)
        self.encoder = encoder
        self.w, self.b = w.float().cpu(), float(b)  # (D,), scalar
        self.feat_mean, self.feat_std = feat_mean.float().cpu(), feat_std.float().cpu()  # (D,) each
        self.truncation = encoder.truncation

    def from_features(self, phi: torch.Tensor) -> torch.Tensor:
        """Raw scores of precomputed features: (N, D) -> (N,)."""
        return ((phi.float().cpu() - self.feat_mean) / self.feat_std) @ self.w + self.b

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return self.from_features(self.encoder(list(completions), list(prompts)))

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.contiguous(), "b": torch.tensor([self.b]), "feat_mean": self.feat_mean.contiguous(),
                   "feat_std": self.feat_std.contiguous()}, str(path / "linear.safetensors"))
        encoder = MINILM
        if self.encoder.spec != MINILM:  # our own LM: keep a copy, so the RM outlives the LM's run dir
            if (path / "encoder").exists():
                shutil.rmtree(path / "encoder")
            shutil.copytree(self.encoder.path, path / "encoder")
            encoder = "encoder"
        features = {"encoder": encoder, "encoder_source": self.encoder.spec, "pooling": "mean",
                    "layers": self.encoder.layers, "max_len": self.encoder.max_len, "bf16": self.encoder.bf16,
                    "dim": self.encoder.dim, "truncation": self.encoder.truncation}
        self.write_config(path, {"features": features, **(extra or {})})
        return path


def load_linear(path: str | Path, device: str | torch.device = "cpu") -> LinearRewardModel:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    feat = cfg["features"]
    spec = MINILM if feat["encoder"] == MINILM else str(path / feat["encoder"])
    # Models saved before the truncation rule was recorded cut their texts from the right.
    enc = Encoder(spec, device=device, max_len=feat["max_len"], bf16=feat.get("bf16", False),
                  layers=feat.get("layers", -1), truncation=feat.get("truncation", "right"))
    t = load_file(str(path / "linear.safetensors"))
    return LinearRewardModel(enc, t["w"], float(t["b"][0]), t["feat_mean"], t["feat_std"],
                             **_norm_kw(cfg))


def _norm_kw(cfg: dict) -> dict:
    info = {k: cfg[k] for k in ("name", "preference_scale") if k in cfg}
    return {"norm_mean": cfg["normalization"]["mean"], "norm_std": cfg["normalization"]["std"], "info": info}


# --------------------------------------------------------------------------------------------------
# Deep: backbone + scalar head
# --------------------------------------------------------------------------------------------------
class DeepRewardModel(TextRewardModel):
    """ScalarHeadModel pooled into one score per text: mean of the per-token scores, the first token
    ([CLS] of a BERT-style encoder) or the last real token (causal LMs, as in InstructGPT)."""

    kind = "deep"

    def __init__(self, net: ScalarHeadModel, tokenizer: Any, pooling: str = "mean", max_len: int = 128,
                 batch_size: int = 64, bf16: bool = False, truncation: str = "left", **kw: Any) -> None:
        super().__init__(**kw)
        causal = getattr(net.config, "model_type", "") in CAUSAL_TYPES
        if pooling == "cls" and causal:
            raise ConfigError("pooling 'cls' reads the first token, which a causal LM computes without "
                              "seeing the text; use 'last' or 'mean'")
        self.net, self.tokenizer, self.pooling = net, tokenizer, pooling
        self.max_len, self.batch_size, self.bf16 = max_len, batch_size, bf16
        self.truncation = truncation
        self.text_tokenizer = TextTokenizer(tokenizer, max_len, truncation)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def tokenize(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (B, T) of prompt + completion, cut by the truncation rule."""
        return self.text_tokenizer.batch(prompts, completions, self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Differentiable raw scores: (B, T) -> (B,) float32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            values = self.net(input_ids, attention_mask)  # (B, T), one scalar per token
        values = values.float()
        if self.pooling == "mean":  # the head is linear, so this is head(mean hidden state)
            return masked_mean(values, attention_mask, dim=1)
        if self.pooling == "cls":
            return values[:, 0]
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        was_training = self.net.training
        self.net.eval()
        rows, where = unique_rows(self.text_tokenizer.ids(prompts, completions))  # same tokens, same score
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = torch.empty(len(rows))
        for s in range(0, len(rows), self.batch_size):
            idx = order[s:s + self.batch_size]
            out[idx] = self.forward(**self.text_tokenizer.pad([rows[i] for i in idx], self.device)).cpu()
        self.net.train(was_training)
        return out[where]

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        self.net.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.write_config(path, {"pooling": self.pooling, "max_len": self.max_len, "bf16": self.bf16,
                                 "backbone_type": self.net.config.model_type, **(extra or {})})
        return path


def load_deep(path: str | Path, device: str | torch.device = "cpu") -> DeepRewardModel:
    from transformers import AutoTokenizer

    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    net = ScalarHeadModel.from_pretrained(path).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "right"  # saved with the model; set again in case an older tokenizer config says left
    return DeepRewardModel(net, tok, cfg["pooling"], cfg["max_len"], bf16=cfg.get("bf16", False),
                           truncation=cfg.get("truncation", "right"), **_norm_kw(cfg))
