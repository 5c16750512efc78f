"""Every shipped RL config parses and validates; bad RL combinations are rejected before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit import config as C
from rlhfkit.cli import STAGES
from rlhfkit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the example configs, one folder per stage


RL_STAGES = ("ppo", "grpo", "rloo", "reinforce", "dpo")


@pytest.mark.parametrize("path", sorted(p for s in RL_STAGES for p in (CONFIGS / s).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_parse(path):
    stage = path.parent.name
    cls = getattr(C, STAGES[stage][1])
    cfg = C.parse_config(cls, ["--config", str(path)])
    assert cfg.model.name_or_path


@pytest.mark.parametrize("cls,argv,msg", [
    (C.GRPOConfig, ["--rollout.samples_per_prompt", "1"], "samples_per_prompt >= 2"),
    (C.RLOOConfig, ["--rollout.samples_per_prompt", "1"], "leaves one out"),
    (C.PPOConfig, ["--mini_batches", "3"], "does not split"),
    (C.PPOConfig, ["--optim.grad_accum", "2"], "grad_accum is derived"),
    (C.GRPOConfig, ["--rollout.top_p", "0"], "top_p"),
    (C.GRPOConfig, ["--kl.target", "1", "--kl.coef", "0"], "needs kl.coef"),
    (C.DPOConfig, ["--data.source", "p.jsonl", "--label_smoothing", "0.7"], "label_smoothing"),
])
def test_bad_rl_configs_are_rejected(cls, argv, msg):
    cfg = cls()
    cfg.model.name_or_path = "some/policy"
    with pytest.raises(ConfigError, match=msg):
        for i in range(0, len(argv), 2):
            C._set(cfg, argv[i][2:], argv[i + 1], argv[i])
        C.check_config(cfg)


def test_rl_stages_need_a_policy():
    with pytest.raises(ConfigError, match="needs model.name_or_path"):
        C.check_config(C.PPOConfig())
