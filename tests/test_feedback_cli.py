"""`rlhfkit feedback ...` end to end in-process: import (JSONL, texts, a policy), users, assign, label,
export, agreement, db; and clear one-line errors for bad input."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import tomllib

from rlhfkit.cli import main
from rlhfkit.feedback.store import Store


def run(*args: str) -> int:
    return main(["feedback", *args])


def test_cli_import_label_export_agreement(tmp_path, capsys, monkeypatch):
    db = str(tmp_path / "fb.db")
    samples = tmp_path / "s.jsonl"
    samples.write_text("\n".join(json.dumps({"prompt": "Review:", "completion": c, "model": "m0"})
                                 for c in ("I love it", "I hate it", "It is fine", "Awful, awful film")))
    assert run("import", "--db", db, "--samples", str(samples), "--project", "demo", "--kinds", "rate,rank",
               "--overlap", "2", "--scale=-4,4") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 4 and out["items_rank"] == 1 and out["round"] == 1
    assert run("import", "--db", db, "--texts", "vader:tweets", "--limit", "5", "--project", "demo",
               "--round", "1", "--overlap", "2") == 0
    assert json.loads(capsys.readouterr().out)["items_rate"] == 5
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-pass\n"))
    assert run("users", "add", "ann", "--db", db, "--password-stdin", "--token") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "created annotator ann" and lines[1].startswith("rk_")
    assert Store(db).login("ann", "s3cret-pass")["name"] == "ann"
    assert run("users", "add", "bob", "--db", db, "--no-password") == 0
    assert run("assign", "--db", db, "--project", "demo", "--overlap", "2", "--annotators", "ann,bob") == 0
    assert "20 new assignments" in capsys.readouterr().out          # 10 tasks x 2
    assert run("users", "list", "--db", db) == 0
    assert "ann" in capsys.readouterr().out
    # Two simulated people do the work instead (the pre-assigned humans keep their tasks pending).
    assert run("assign", "--db", db, "--project", "demo", "--overlap", "4") == 0
    assert run("label", "--db", db, "--project", "demo", "--labeler", "vader-rater", "--count", "2") == 0
    out = capsys.readouterr().out
    assert "vader-rater-0: 10 answers" in out and "vader-rater-1: 10 answers" in out
    assert run("export", "--db", db, "--project", "demo", "--out", str(tmp_path / "out")) == 0
    ratings = [json.loads(x) for x in (tmp_path / "out" / "ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 18 and {r["annotator"] for r in ratings} == {"vader-rater-0", "vader-rater-1"}
    assert all(-4 <= r["rating"] <= 4 for r in ratings)
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 2 * 6                                        # 2 rankings of K=4 -> 6 pairs each
    capsys.readouterr()
    assert run("agreement", "--db", db, "--project", "demo") == 0
    ag = json.loads(capsys.readouterr().out)
    assert ag["ratings_units"] == 9 and ag["rankings_units"] == 4
    assert run("db", "current", "--db", db) == 0
    assert capsys.readouterr().out == "schema at 0002 (newest: 0002)\n"
    # ann and bob never came: their 20 pre-assigned tasks go back to the pool.
    assert run("release", "--db", db, "--project", "demo", "--older-than", "1h") == 0
    assert capsys.readouterr().out == "released 0 stale assignment(s)\n"
    assert run("release", "--db", db, "--project", "demo", "--older-than", "0.001s") == 0
    assert capsys.readouterr().out == "released 20 stale assignment(s)\n"
    with pytest.raises(SystemExit):
        run("release", "--db", db, "--older-than", "soon")
    assert "'soon' is not a duration" in capsys.readouterr().err


def test_cli_import_from_a_policy(tmp_path, tiny_model, tiny_tokenizer, capsys):
    policy = tmp_path / "policy"
    tiny_model.save_pretrained(policy)
    tiny_tokenizer.save_pretrained(policy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI think\n")
    db = str(tmp_path / "fb.db")
    assert run("import", "--db", db, "--policy", str(policy), "--prompts", str(prompts), "--k", "3",
               "--max-new-tokens", "6", "--kinds", "rank") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] + out["empty"] + out["duplicates"] == 6
    with Store(db).read() as s:
        from sqlalchemy import select

        from rlhfkit.feedback.store import Sample

        models = set(s.scalars(select(Sample.model)))
    assert models == {str(policy)}


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "ok"}\n{"prompt": "p"}\n')
    assert run("import", "--db", db, "--samples", str(bad)) == 2
    assert "bad.jsonl:2: missing field 'completion'" in capsys.readouterr().err
    assert run("import", "--db", db) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert run("export", "--db", db, "--project", "nope", "--out", str(tmp_path / "o")) == 2
    assert "no project named 'nope'" in capsys.readouterr().err
    assert run("users", "add", "x y", "--db", db, "--no-password") == 2
    assert "annotator name" in capsys.readouterr().err
    for flags, msg in ((["--port", "70000"], "port=70000 must be in 0..65535"),
                       (["--max_body_kb", "1"], "max_body_kb=1 is too small")):
        with pytest.raises(SystemExit) as e:                # config errors exit before anything starts
            main(["feedback", "serve", "--db", db, *flags])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_package_data_ships_templates_static_and_migrations():
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rlhfkit"]
    pkg = root / "src" / "rlhfkit"
    data = [p.relative_to(pkg) for p in (pkg / "feedback").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data, "no data files found"
    for f in data:
        assert any(f.match(pat) for pat in patterns), f"{f} is not covered by package-data {patterns}"
