"""Metric fan-out: JSONL (strict JSON, truncated on resume), TensorBoard events, readable stdout line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfkit.config import LogConfig, load_yaml
from rlhfkit.utils.logging import MetricLogger, read_jsonl


def test_jsonl_tensorboard_and_stdout(tmp_path, capsys):
    with MetricLogger(tmp_path, LogConfig(progress=False), total_steps=10) as log:
        log.log({"loss/train": 2.5, "lr": 1e-3, "weird": math.nan}, 1)
        log.log({"loss/train": 2.0, "perf/tokens_per_s": 1234.0}, 2)
        log.log_text("sample/x", "hello world", 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["weird"] is None  # NaN -> null, strict JSON
    assert "step 2/10 | loss/train 2 | perf/tokens_per_s 1234" in capsys.readouterr().out
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss/train")] == [2.5, 2.0]
    assert json.loads((tmp_path / "samples.jsonl").read_text())["text"] == "hello world"


def test_resume_truncates_later_steps_and_tolerates_a_torn_line(tmp_path):
    with MetricLogger(tmp_path, LogConfig(progress=False, tensorboard=False)) as log:
        for s in range(1, 6):
            log.log({"loss/train": float(s)}, s, echo=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss/tr')  # a crash mid-write
    with MetricLogger(tmp_path, LogConfig(progress=False, tensorboard=False), start_step=3) as log:
        log.log({"loss/train": 40.0}, 4, echo=False)
    assert [(r["step"], r["loss/train"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_missing_wandb_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    from rlhfkit.errors import ConfigError

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricLogger(tmp_path, LogConfig(wandb_project="p", tensorboard=False))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


STAGE_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    """configs/accelerate/*.yaml are accelerate launcher configs: accelerate itself must accept them."""
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(path))
    assert c.num_processes >= 2 and c.mixed_precision == "bf16"


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_parse(path):
    """configs/<stage>/*.yaml must parse and pass the checks of that stage's config."""
    from rlhfkit import config
    from rlhfkit.cli import STAGES

    stage = getattr(config, STAGES[path.parent.name][1])
    data, lines = load_yaml(path)
    cfg = stage()
    config.apply_mapping(cfg, data, str(path), lines)
    config.check_config(cfg)
