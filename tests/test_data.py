"""Offline data sources: real human ratings parse right; bad local files fail with file:line: problem."""
from __future__ import annotations

import json

import pytest

from rlhfkit.data import sources
from rlhfkit.errors import DataError


def test_vader_items_are_the_published_counts():
    items = sources.vader_items()
    by_domain = {d: [i for i in items if i.domain == d] for d in sources.VADER_DOMAINS}
    # Line counts of the *_GroundTruth.txt files in the ICWSM 2014 archive.
    assert {d: len(v) for d, v in by_domain.items()} == {"movie": 10605, "amazon": 3708, "nyt": 5190,
                                                         "tweets": 4200}
    assert len({i.id for i in items}) == len(items)
    first = by_domain["movie"][0]
    assert first.text.startswith("The Rock is destined")
    assert first.ratings == [3, 2, 2, 2, 0, 4, 3, 1, 2, 2, 4, 3, 3, 1, 2]
    assert first.mean == pytest.approx(2.2667, abs=1e-4)
    assert all(-4 <= r <= 4 for i in items for r in i.ratings)
    assert min(len(i.ratings) for i in items) >= 10


def test_vader_cache_records_licence_and_hashes():
    sources.vader_items(["movie"])
    info = json.loads((sources.data_dir() / "vader" / "SOURCE.json").read_text())
    assert info["licence"] == "MIT" and info["archive_sha256"] == sources.PACKAGES["vader"].sha256
    assert "movieReviewSnippets_GroundTruth.txt" in info["files"]


def test_vader_lexicon_has_ten_raters_per_word():
    lex = sources.vader_lexicon()
    assert len(lex) > 7000
    mean, ratings = lex["good"]
    assert len(ratings) == 10 and mean == pytest.approx(sum(ratings) / 10, abs=0.06)


def test_chatterbot_pairs():
    pairs = sources.chatterbot_pairs()
    assert len(pairs) > 2000
    assert {"prompt": "Good morning, how are you?", "response": "I am doing well, how about you?",
            "category": "conversations"} in pairs


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    import shutil

    archive = sources.fetch_package("vader")  # from the session cache: no network here
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copy(archive, tmp_path / "downloads")
    items = sources.vader_items(["tweets"])
    (tmp_path / "vader" / "tweets_GroundTruth.txt").write_text("tampered\n")
    assert sources.vader_items(["tweets"]) == items  # re-extracted from the SHA-256-checked archive
    # A corrupted archive is refused and removed.
    (tmp_path / "downloads" / archive.name).write_bytes(b"not the archive")
    shutil.rmtree(tmp_path / "vader")
    class Offline:
        returncode, stdout, stderr = 1, "", "ERROR: network is unreachable"

    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: Offline())
    with pytest.raises(DataError, match="could not fetch vaderSentiment==3.3.2"):
        sources.vader_items(["tweets"])


@pytest.mark.parametrize("content, expect", [
    ('{"text": "ok"}\n{"text": "fine"\n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "bad.jsonl:3: missing field 'text' (fields present: body)"),
    ('{"text": 5}\n', "bad.jsonl:1: field 'text' must be a string, got int"),
    ('["text"]\n', "bad.jsonl:1: expected a JSON object, got list"),
    ("", "bad.jsonl: no records"),
])
def test_malformed_jsonl_names_file_line_problem(tmp_path, content, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        sources.load_texts(str(p))
    assert expect in str(e.value)


def test_non_utf8_text_file_names_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine line\nsecond\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad.txt:3: not valid UTF-8"):
        sources.load_texts(str(p))


def test_local_files_and_pairs(tmp_path):
    t = tmp_path / "c.txt"
    t.write_text("one doc\n\n  two doc  \n")
    assert sources.load_texts(str(t)) == ["one doc", "two doc"]
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"q": "hi", "a": "hello"}) + "\n")
    assert sources.load_pairs(str(j), "q", "a") == [{"prompt": "hi", "response": "hello"}]
    with pytest.raises(DataError, match="missing field 'prompt'"):
        sources.load_pairs(str(j))


def test_unknown_source_and_missing_file():
    with pytest.raises(DataError, match="unknown data source 'nope'"):
        sources.load_texts("nope")
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        sources.load_texts("missing.jsonl")
    with pytest.raises(DataError, match="unknown vader domain 'films'"):
        sources.load_texts("vader:films")
