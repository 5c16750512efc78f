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


def test_dpo_resume_after_interrupt_reproduces_the_uninterrupted_run(tmp_path, tiny_tokenizer, tiny_model_cfg,
                                                                     monkeypatch):
    """Ctrl-C during step 4 checkpoints and stops; the rerun resumes from it and follows the uninterrupted run
    exactly. The reference log-probs must again be the starting model's, not the checkpoint's."""
    import os
    import signal

    from rlhfkit.train.dpo import train
    from rlhfkit.utils.logging import MetricLogger

    policy = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    pairs = write_pairs(tmp_path / "pairs.jsonl")

    def cfg(run_dir):
        c = DPOConfig()
        c.model.name_or_path, c.data.source = policy, pairs
        c.optim.lr, c.optim.batch_size, c.optim.grad_accum, c.optim.max_steps = 1e-3, 4, 2, 8
        c.log.run_dir, c.log.log_every, c.log.eval_every, c.log.save_every = str(tmp_path / run_dir), 1, 4, 0
        c.log.tensorboard = c.log.progress = False
        c.run.threads = 1
        check_config(c)
        return c

    def curve(run_dir):
        return [(r["step"], r.get("loss/train"), r.get("dpo/margin"), r.get("eval/margin"))
                for r in read_jsonl(tmp_path / run_dir / "metrics.jsonl")]

    train(cfg("ref"))
    real = MetricLogger.log

    def interrupt(self, metrics, step, **kw):
        real(self, metrics, step, **kw)
        if step == 4 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricLogger, "log", interrupt)
    first = train(cfg("run"))
    assert first["steps"] == 4 and (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()
    monkeypatch.setattr(MetricLogger, "log", real)
    second = train(cfg("run"))
    assert curve("run") == curve("ref") and len(curve("ref")) == 8 + 2  # bit-exact, every step and evaluation
    assert second["eval/margin"] == json.loads((tmp_path / "ref" / "summary.json").read_text())["eval/margin"]
