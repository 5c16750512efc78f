"""A transformer backbone with a linear head giving one scalar per token.

Used as the PPO critic (a value per token) and as the deep reward model (the value at the last real token
of prompt + response). The backbone is any HF model's base (`model.base_model`: LlamaModel, GPT2Model,
BertModel, ...), so it saves and loads in HF format:

    path/backbone/            save_pretrained of the backbone (config.json + safetensors)
    path/scalar_head.safetensors   head weight and bias
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where attention_mask is 1, per row (works for left or right padding).

    (B, T) -> (B,) int64.
    """
    T = attention_mask.size(1)
    return (T - 1 - attention_mask.flip(1).to(torch.int64).argmax(1)).to(torch.int64)


class ScalarHeadModel(nn.Module):
    def __init__(self, backbone: nn.Module, init_std: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        # A zero head starts every value/reward at 0, so an untrained critic does not inject noise.
        nn.init.normal_(self.head.weight, std=init_std) if init_std else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_causal_lm(cls, model: nn.Module, init_std: float = 0.0) -> ScalarHeadModel:
        """Take the base of a causal LM (dropping its LM head) as the backbone."""
        return cls(model.base_model, init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar per position: (B, T) ids -> (B, T) float32."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        if attention_mask is not None and getattr(self.backbone.config, "model_type", "") in (
                "llama", "gpt2", "mistral", "qwen2"):
            # Left padding: positions must count real tokens only, as in generation.
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.values(self.backbone(input_ids=input_ids, **kw).last_hidden_state)

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """The head on the backbone's hidden states: (B, T, H) -> (B, T) float32."""
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence, read at its last real token: (B, T) -> (B,)."""
        values = self.forward(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str | Path, **_: object) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path / "backbone", safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / "scalar_head.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ScalarHeadModel:
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        model = cls(AutoModel.from_pretrained(path / "backbone", dtype=dtype))
        model.head.load_state_dict(load_file(str(path / "scalar_head.safetensors")))
        return model
