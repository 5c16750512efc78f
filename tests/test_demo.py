"""`rlhfkit demo` end to end at a small size (through the CLI, as `make demo` runs it): every stage runs on
the shipped data, the summary and the report hold the numbers, and a second invocation redoes nothing."""
from __future__ import annotations

import json
import math

import pytest

SMALL = ["--pretrain.optim.max_steps", "40", "--pretrain.optim.warmup_steps", "5",
         "--pretrain.log.eval_every", "20", "--pretrain.eval_sequences", "16",
         "--ppo.optim.max_steps", "5", "--ppo.rollout.prompts_per_step", "8", "--ppo.rollout.max_new_tokens", "8",
         "--overopt_every", "1", "--overopt_prompts", "8",
         "--eval.data.max_prompts", "8", "--eval.rollout.samples_per_prompt", "1",
         "--eval.rollout.max_new_tokens", "8", "--eval.ppl_docs", "16"]


def test_demo_overopt_settings_checked_at_parse_time(capsys):
    from rlhfkit.config import DemoConfig, parse_config

    assert parse_config(DemoConfig, ["--overopt_every", "0"]).overopt_every == 0
    assert parse_config(DemoConfig, ["--overopt_every", "20"]).overopt_every == 20  # 5 points in 100 steps
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--overopt_every", "30"])
    assert "leaves fewer than 5 checkpoints" in capsys.readouterr().err


def test_smollm2_preset_sets_defaults_and_flags_win(capsys):
    from rlhfkit.config import DEMO_PRESETS, DemoConfig, parse_config

    cfg = parse_config(DemoConfig, ["--preset", "smollm2", "--ppo.optim.max_steps", "48",
                                    "--eval.data.max_prompts", "7"])
    assert (cfg.base_model, cfg.ppo.model.lora_r, cfg.ppo.kl.target, cfg.overopt_every) == ("smollm2", 16, 6.0, 8)
    assert (cfg.ppo.optim.max_steps, cfg.eval.data.max_prompts) == (48, 7)  # given: not the preset's 40, 100
    assert set(DEMO_PRESETS["smollm2"]) >= {"base_model", "ppo.model.lora_r", "ppo.kl.target"}
    tiny = parse_config(DemoConfig, [])
    assert (tiny.base_model, tiny.ppo.model.lora_r, tiny.ppo.kl.target, tiny.ppo.optim.max_steps) == ("", 0, 8.0, 100)
    # The checks run on the preset's values: 40 steps // 12 leaves 3 checkpoints for the curve.
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--preset", "smollm2", "--overopt_every", "12"])
    assert "overopt_every=12 leaves fewer than 5 checkpoints in ppo.optim.max_steps=40" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--preset", "gpt5"])


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path, capsys):
    from rlhfkit.cli import main

    run_dir = tmp_path / "demo"
    assert main(["demo", "--run_dir", str(run_dir), *SMALL]) == 0
    out = capsys.readouterr().out
    s = json.loads((run_dir / "summary.json").read_text())
    # The pretrained LM beats the unigram floor even after 40 steps; the reward models correlate with people.
    assert s["val_ppl"] < s["unigram_val_ppl"]
    assert s["rm_pearson_heldout"] > 0.3 and s["rm_gold_pearson_heldout"] > 0.3
    assert s["ppo_steps"] == 5 and s["eval_prompts"] == 8
    assert s["kl_mean"] > 0 and math.isfinite(s["kl_mean"])
    assert 0 <= s["judge_positive_rate_before"] <= 1 and 0 <= s["judge_positive_rate_after"] <= 1
    html = (run_dir / "report.html").read_text()
    assert "judge_positive_rate" in html and html.count("<img") >= 3
    # The over-optimisation curve: the pretrained model (step 0) and every PPO step's checkpoint.
    curve = [json.loads(line) for line in (run_dir / "ppo" / "overopt.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 1, 2, 3, 4, 5] and curve[-1]["kl"]["mean"] > 0
    assert sorted(p.name for p in (run_dir / "ppo" / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert "over-optimisation" in html and "KL vs target" in html
    assert "== rlhfkit demo: done" in out

    # A second run finds every stage done and redoes nothing (the stages resume from their markers).
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "pretrain" / "final").iterdir()}
    assert main(["demo", "--run_dir", str(run_dir), *SMALL]) == 0
    assert "all stages done before" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (run_dir / "pretrain" / "final").iterdir()}
