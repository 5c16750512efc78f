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


# ---------------------------------------------------------------------------------------------------
# Browser tests: Debian's Chromium driven by Playwright (no `playwright install`, which downloads)
# ---------------------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary; installs Debian's package when missing (fails loudly if it cannot;
    RLHFKIT_SKIP_BROWSER=1 skips browser tests on purpose)."""
    import subprocess

    if os.environ.get("RLHFKIT_SKIP_BROWSER") == "1":
        pytest.skip("RLHFKIT_SKIP_BROWSER=1")
    if not os.access(CHROMIUM, os.X_OK):
        setup = Path(__file__).with_name("setup_browser.sh")
        proc = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"no Chromium at {CHROMIUM} and {setup.name} could not install it:\n"
                        f"{proc.stderr[-2000:]}\n(set RLHFKIT_SKIP_BROWSER=1 to skip browser tests)")
    return CHROMIUM


@pytest.fixture(autouse=True)
def _kernels_back_on():
    """A run with run.accel=off switches our kernels off for its process (accel.select); the next test
    starts from the default again."""
    yield
    import sys

    native = sys.modules.get("rlhfkit.accel.native")
    if native is not None:
        native.set_enabled(True)
