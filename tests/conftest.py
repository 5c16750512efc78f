"""Shared fixtures: tiny random models built in-process (no downloads), a shared data cache, and a
tiny tokenizer trained on a few hundred real snippets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# One cache for the whole session (the vader sdist is fetched once, SHA-256 checked). Respect a cache the
# user already has.
os.environ.setdefault("RLHFKIT_DATA_DIR", str(Path.home() / ".cache" / "rlhfkit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one thread is faster than two (no sync overhead) and immune to a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def vader_texts() -> list[str]:
    from rlhfkit.data.sources import load_texts

    return load_texts("vader")


@pytest.fixture(scope="session")
def tiny_tokenizer(vader_texts):
    """A 512-token byte-level BPE trained on 3,000 real snippets (about a second)."""
    from rlhfkit.data.tokenizer import train_tokenizer

    return train_tokenizer(vader_texts[:3000], vocab_size=512)


@pytest.fixture
def tiny_model_cfg():
    from rlhfkit.config import ModelConfig

    return ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=64)


@pytest.fixture
def tiny_model(tiny_model_cfg, tiny_tokenizer):
    import torch

    from rlhfkit.models.factory import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_cfg, tiny_tokenizer)
