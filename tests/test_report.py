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


def test_kl_hold_by_hand():
    from rlhfkit.eval.report import kl_hold

    # Steps 1..10, second half = steps 6..10 with KL 2, 4, 8, 12, 13: mean 7.8; 4, 8, 12 within 8 +- 50%.
    rows = [{"step": s, "kl/mean": k} for s, k in enumerate([0, 0, 0, 0, 0, 2, 4, 8, 12, 13], start=1)]
    h = kl_hold(rows, 8.0)
    assert h["second_half_mean"] == 7.8 and h["second_half_within_50pct"] == 0.6
    assert kl_hold([], 8.0) == {}


def test_report_plots_kl_target_and_overoptimisation(tmp_path):
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    with open(ppo / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "kl/mean": 0.8 * s, "kl/coef": 0.2}) + "\n" for s in range(1, 11))
    ci = lambda m: {"mean": m, "low": m - 0.1, "high": m + 0.1}
    with open(ppo / "overopt.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "kl": ci(0.8 * s), "proxy": ci(0.1 * s), "gold": ci(0.05 * s),
                                 "ref_ppl": 20.0 + s}) + "\n"
                     for s in range(0, 11, 2))
    out = build_report(tmp_path)
    names = sorted(p.name for p in (tmp_path / "report_files").iterdir())
    assert not any("KL_vs_target" in n for n in names)  # no config.yaml: no target known
    assert any("over_optimisation" in n for n in names)

    (ppo / "config.yaml").write_text("kl:\n  coef: 0.2\n  target: 8.0\n")
    for p in (tmp_path / "report_files").iterdir():
        p.unlink()
    page = build_report(tmp_path).read_text()
    names = sorted(p.name for p in (tmp_path / "report_files").iterdir())
    assert any("KL_vs_target" in n for n in names) and any("over_optimisation" in n for n in names)
    assert page.count("data:image/png;base64,") == len(names) and out.exists()
    assert "<td class='num'>30</td>" in page and "1.000 [0.900, 1.100]" in page  # step 10's ref_ppl, proxy
