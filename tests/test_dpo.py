"""DPO raises the chosen-vs-rejected margin on preference pairs, and its held-out accuracy; IPO too."""
from __future__ import annotations

import json
import random

import pytest

from rlhfkit.config import DPOConfig, check_config
from rlhfkit.utils.logging import read_jsonl
from tests.rl_utils import PROMPTS, make_policy_dir


def write_pairs(path, n=48, seed=0):
    """Chosen completions are calm and positive, rejected ones shouty; some ties that must be skipped."""
    rng = random.Random(seed)
    good = ["a lovely film", "I really enjoyed it", "quite good overall", "a fine and gentle story"]
    bad = ["BAD BAD BAD!!!", "TERRIBLE. AWFUL.", "WORST EVER!!", "NO NO NO!!!"]
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": rng.choice(PROMPTS), "chosen": rng.choice(good),
                                "rejected": rng.choice(bad), "annotator": "sim"}) + "\n" for i in range(n))
        f.write(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "tie": True}) + "\n")
    return str(path)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_raises_margin(loss, tmp_path, tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.train.dpo import train

    cfg = DPOConfig()
    cfg.model.name_or_path = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    cfg.data.source = write_pairs(tmp_path / "pairs.jsonl")
    cfg.data.val_fraction = 0.25
    cfg.loss = loss
    cfg.optim.lr = 1e-3
    cfg.optim.batch_size = 8
    cfg.optim.max_steps = 20
    cfg.log.run_dir = str(tmp_path / "run")
    cfg.log.log_every = 1
    cfg.log.eval_every = 10
    cfg.log.tensorboard = cfg.log.progress = False
    cfg.run.threads = 1
    check_config(cfg)
    summary = train(cfg)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "dpo/margin" in r]
    assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert rows[-1]["dpo/margin"] > 0.5 and rows[-1]["dpo/accuracy"] == 1.0
    assert rows[-1]["loss/train"] < rows[0]["loss/train"]
    assert summary["train_pairs"] == 36 and summary["val_pairs"] == 12  # the tie was skipped
    assert summary["eval/accuracy"] == 1.0 and summary["eval/margin"] > 0.5
