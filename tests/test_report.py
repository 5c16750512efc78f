"""The HTML report: plots for every stage found, before/after with intervals, escaped samples."""
from __future__ import annotations

import json

from rlhfkit.eval.report import build_report


def test_report_of_a_multi_stage_run(tmp_path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    with open(ppo / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "rollout/reward_mean": 0.1 * s, "kl/mean": 0.01 * s,
                                "loss/policy": 1.0 / s, "perf/tokens_per_s": 1000.0}) + "\n" for s in range(1, 11))
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 12.5, "kl_mean": 0.05}))
    ev = {"judge_positive_rate_before": {"mean": 0.3, "low": 0.2, "high": 0.4},
          "judge_positive_rate_after": {"mean": 0.7, "low": 0.6, "high": 0.8},
          "samples": [{"prompt": "<script>alert(1)</script>", "before": "meh", "after": "great"}]}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(ev))
    out = build_report(tmp_path)
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 5  # reward, KL, loss, throughput + before/after bars
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "0.700 [0.600, 0.800]" in page
    pngs = sorted(p.name for p in (tmp_path / "report_files").iterdir())
    assert len(pngs) == 5 and any("Reward" in p for p in pngs) and any("KL" in p for p in pngs)


def test_report_cli_on_missing_dir_is_a_clear_error(tmp_path, capsys):
    from rlhfkit.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
