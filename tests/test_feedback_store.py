"""The feedback store: schema migrations, import, claims with overlap, idempotent answers, undo/skip,
free-standing chat feedback, export in docs/formats.md shapes, cleaning, simulated labelers."""
from __future__ import annotations

import json
import math
import random
import time

import pytest
from sqlalchemy import func, select

from rlhfkit.errors import ConfigError
from rlhfkit.feedback import migrate
from rlhfkit.feedback.export import clean, export, normalize_ws, records
from rlhfkit.feedback.labelers import BradleyTerryLabeler, VaderRater, make_labeler, run_labeler
from rlhfkit.feedback.store import (
    Base,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Store,
    Submission,
    Task,
    hash_password,
    verify_password,
)


@pytest.fixture
def store(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    yield st
    st.close()


def _samples(prompt, *completions):
    return [{"prompt": prompt, "completion": c} for c in completions]


# ---- schema --------------------------------------------------------------------------------------
def test_migrations_match_the_models_and_downgrade_cleanly(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    st = Store(str(tmp_path / "m.db"))           # a fresh SQLite file is upgraded automatically
    assert migrate.current(st) == migrate.head()
    with st.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []                            # the migration scripts build exactly the ORM schema
    migrate.downgrade(st, "base")
    assert set(inspect(st.engine).get_table_names()) <= {"alembic_version"}
    st.close()
    # A database behind the newest schema is not touched silently: a clear error names the command.
    with pytest.raises(ConfigError, match="rlhfkit feedback db upgrade"):
        Store(str(tmp_path / "m.db"), upgrade="never")


def test_sqlite_runs_in_wal_mode(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_passwords_are_salted_scrypt():
    h1, h2 = hash_password("hunter22"), hash_password("hunter22")
    assert h1 != h2 and h1.startswith("scrypt$")
    assert verify_password("hunter22", h1) and not verify_password("hunter23", h1)
    assert not verify_password("x", None) and not verify_password("x", "garbage")


# ---- import and tasks ----------------------------------------------------------------------------
def test_import_makes_items_of_each_kind_and_skips_dupes_and_empties(store):
    counts = store.import_samples(
        _samples("p", "a", "b", "c", "d", "e", "a", "  ") + _samples("q", "x\r\n  "),
        kinds=("rate", "rank", "pair", "edit"), group_size=3)
    # p has 5 distinct samples: rank groups of 3 -> [a b c] [d e]; pairs -> (a b) (c d); q has one.
    assert counts == {"samples": 6, "duplicates": 1, "empty": 1, "items_rate": 6, "items_rank": 2,
                      "items_pair": 2, "items_edit": 6, "round": 1}
    assert store.import_samples(_samples("p", "a", "f"), round=1)["duplicates"] == 1
    assert store.import_samples(_samples("p", "z"))["round"] == 2     # no round given: a new one
    with pytest.raises(Invalid, match="unknown task kind"):
        store.import_samples(_samples("p", "a"), kinds=("judge",))
    with pytest.raises(Invalid, match="sample 0"):
        store.import_samples([{"prompt": "p", "completion": 3}])
    with pytest.raises(Conflict, match="overlap"):
        store.import_samples(_samples("p", "new"), round=1, overlap=3)


def test_overlap_k_annotators_per_item_then_nothing_left(store):
    store.import_samples(_samples("p", "a", "b", "c"), overlap=2)
    people = [store.add_annotator(n) for n in ("u1", "u2", "u3")]
    seen = {p: [] for p in people}
    for p in people * 3:
        t = store.next_task(p)
        if t is not None:
            seen[p].append(t.item_id)
            store.submit(p, t.item_id, {"kind": "rate", "rating": 3, "submission_id": t.submission_id})
    per_item = {}
    for p, items in seen.items():
        assert len(items) == len(set(items))              # nobody gets an item twice
        for i in items:
            per_item[i] = per_item.get(i, 0) + 1
    assert per_item == {1: 2, 2: 2, 3: 2}                 # each item exactly `overlap` times
    assert all(store.next_task(p) is None for p in people)
    assert store.count_labelled("default", 1) == 3
    assert store.count_labelled("default", 1, min_answers=3) == 0


def test_answers_are_idempotent_and_validated(store):
    store.import_samples(_samples("p", "a", "b", "c"), kinds=("rank", "pair"), group_size=3)
    alice, bob = store.add_annotator("alice"), store.add_annotator("bob")
    rank = store.next_task(alice)
    assert rank.kind == "rank" and [s["text"] for s in rank.samples] == ["a", "b", "c"]
    ids = [s["id"] for s in rank.samples]
    bad = [({"kind": "rank", "order": ids[:2]}, Invalid), ({"kind": "rank", "order": [ids[0]] * 3}, Invalid),
           ({"kind": "pair", "chosen": ids[0]}, Invalid), ({"kind": "rate", "rating": 3}, Invalid)]
    for answer, err in bad:
        with pytest.raises(err):
            store.submit(alice, rank.item_id, {**answer, "submission_id": rank.submission_id})
    with pytest.raises(Invalid, match="submission_id"):
        store.submit(alice, rank.item_id, {"kind": "rank", "order": ids, "submission_id": "x"})
    with pytest.raises(Forbidden, match="not assigned to you"):
        store.submit(bob, rank.item_id, {"kind": "rank", "order": ids, "submission_id": "bob-answer-1"})
    with pytest.raises(NotFound):
        store.submit(alice, 999, {"kind": "rank", "order": ids, "submission_id": "unknown-task"})
    first = store.submit(alice, rank.item_id, {"kind": "rank", "order": ids[::-1], "submission_id": rank.submission_id})
    again = store.submit(alice, rank.item_id, {"kind": "rank", "order": ids, "submission_id": rank.submission_id})
    assert not first.duplicate and again.duplicate
    with pytest.raises(Conflict, match="answered it already"):
        store.submit(alice, rank.item_id, {"kind": "rank", "order": ids, "submission_id": "another-id-1"})
    pair = store.next_task(alice)
    with pytest.raises(Conflict, match="another task"):     # an id reused for a different task
        store.submit(alice, pair.item_id, {"kind": "pair", "tie": True, "submission_id": rank.submission_id})
    store.submit(alice, pair.item_id, {"kind": "pair", "tie": True, "submission_id": pair.submission_id})
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Submission)) == 2
    recs = records(store, "default")
    assert [r["completions"] for r in recs["rankings"]] == [["c", "b", "a"]]
    assert [(r["chosen"], r["rejected"], r["source"], r["tie"]) for r in recs["pairs"]] == [
        ("a", "b", "pair", True), ("c", "b", "ranking", False), ("c", "a", "ranking", False),
        ("b", "a", "ranking", False)]


def test_edit_validation_refuses_oversize_no_change_and_bad_unicode(tmp_path):
    st = Store(str(tmp_path / "e.db"), max_text_chars=50)
    st.import_samples(_samples("p", "orig text"), kinds=("edit",))
    a = st.add_annotator("a")
    t = st.next_task(a)
    for edited, msg in (("x" * 51, "limit is 50"), ("orig text  ", "same as the original"), ("a\x00b", "NUL"),
                        ("lone \ud800 surrogate", "edited: text is not valid Unicode")):
        with pytest.raises(Invalid, match=msg):
            st.submit(a, t.item_id, {"kind": "edit", "edited": edited, "submission_id": t.submission_id})
    with pytest.raises(Invalid, match="comment: text is not valid Unicode"):
        st.submit(a, t.item_id, {"kind": "edit", "edited": "Better", "submission_id": t.submission_id,
                                 "comment": "\udfff"})
    # Text that looks like markup is text: stored as written (every page escapes it).
    st.submit(a, t.item_id, {"kind": "edit", "edited": "Use <img alt=x> (x < y)",
                             "submission_id": t.submission_id, "comment": "typo fixed"})
    assert records(st, "default")["edits"][0]["edited"] == "Use <img alt=x> (x < y)"


def test_skip_and_undo(store):
    store.import_samples(_samples("p", "a", "b"), overlap=1)
    a, b = store.add_annotator("a"), store.add_annotator("b")
    t1 = store.next_task(a)
    store.skip(a, t1.item_id)
    assert store.next_task(b).item_id == t1.item_id       # a skipped slot goes to someone else
    t2 = store.next_task(a)
    assert t2.item_id != t1.item_id
    store.submit(a, t2.item_id, {"kind": "rate", "rating": 5, "submission_id": t2.submission_id})
    assert store.undo(a) == t2.item_id                    # the answer is retracted ...
    assert store.next_task(a).item_id == t2.item_id       # ... and the task comes back first
    assert records(store, "default")["ratings"] == []
    store.submit(a, t2.item_id, {"kind": "rate", "rating": 2, "submission_id": "second-try-1"})
    assert [r["rating"] for r in records(store, "default")["ratings"]] == [2.0]
    # The skipped task stays in the total (it used to drop out, so skipping shrank the work).
    assert store.progress(a) == {"done": 1, "skipped": 1, "pending": 0, "available": 0, "total": 2}
    assert store.undo(a) == t2.item_id and store.undo(a) == t1.item_id and store.undo(a) is None


def test_stale_claims_are_released_to_others(store):
    store.import_samples(_samples("p", "a", "b"), overlap=1)
    a, b, c = (store.add_annotator(n) for n in ("a", "b", "c"))
    t1, t2 = store.next_task(a), store.next_task(b)       # a claims item 1 and walks away; b answers item 2
    store.submit(b, t2.item_id, {"kind": "rate", "rating": 4, "submission_id": t2.submission_id})
    assert store.next_task(c) is None                     # every slot is held
    assert store.release_stale("default", None, older_than_s=3600) == 0   # nothing is an hour old yet
    time.sleep(0.05)
    assert store.release_stale("default", 1, older_than_s=0.01) == 1     # only a's untouched claim
    assert store.next_task(c).item_id == t1.item_id       # the slot went back to the pool
    with pytest.raises(Forbidden, match="not assigned to you"):   # a's late answer no longer counts
        store.submit(a, t1.item_id, {"kind": "rate", "rating": 1, "submission_id": t1.submission_id})
    assert [r["rating"] for r in records(store, "default")["ratings"]] == [4.0]
    with pytest.raises(Invalid):
        store.release_stale("default", 1, older_than_s=0)


def test_assign_balances_load(store):
    store.import_samples(_samples("p", *"abcdef"), overlap=1)
    for n in ("x", "y", "z"):
        store.add_annotator(n)
    assert store.assign("default", 1, ["x", "y", "z"], overlap=2) == 12
    loads = {r["name"]: r["pending"] for r in store.stats()["annotators"]}
    assert loads == {"x": 4, "y": 4, "z": 4}
    assert store.assign("default", 1, ["x", "y", "z"], overlap=2) == 0   # nothing new to hand out
    with pytest.raises(Invalid):
        store.assign("default", 1, ["x"], overlap=2)


def test_free_standing_chat_feedback(store):
    store.record_rating("hi", "hello!", 1, user="web:42")
    store.record_rating("hi", "hello!", 0, user="web:7")
    store.record_edit("hi", "hello!", "Hello! How can I help you today?", user="web:42")
    recs = records(store, "chat")
    assert [(r["completion"], r["rating"], r["annotator"], r["scale_min"], r["scale_max"])
            for r in recs["ratings"]] == [("hello!", 1.0, "web:42", 0, 1), ("hello!", 0.0, "web:7", 0, 1)]
    assert recs["edits"][0]["edited"] == "Hello! How can I help you today?"
    with pytest.raises(Invalid):
        store.record_rating("hi", "hello!", 3)                    # outside the thumbs scale 0..1
    with pytest.raises(Invalid, match="Unicode"):
        store.record_edit("hi", "hello!", "bad \ud800")
    # Chat feedback never shows up as tasks for annotators.
    assert store.next_task(store.add_annotator("ann")) is None


# ---- export --------------------------------------------------------------------------------------
def test_export_files_follow_formats_md(store, tmp_path):
    store.import_samples(_samples("Q?", "good answer", "bad answer", "meh"), kinds=("rate", "rank", "edit"),
                         group_size=3)
    a = store.add_annotator("ann")
    while (t := store.next_task(a)) is not None:
        ids = [s["id"] for s in t.samples]
        answer = {"rate": {"rating": 4}, "rank": {"order": ids}, "edit": {"edited": t.samples[0]["text"] + "!"}}
        store.submit(a, t.item_id, {"kind": t.kind, "submission_id": t.submission_id, **answer[t.kind]})
    summary = export(store, "default", tmp_path / "out")
    got = {k: [json.loads(x) for x in (tmp_path / "out" / f"{k}.jsonl").read_text().splitlines()]
           for k in summary}
    assert {k: v["records"] for k, v in summary.items()} == {"ratings": 3, "pairs": 6, "rankings": 1, "edits": 3}
    r = got["ratings"][0]
    assert {"prompt", "completion", "rating", "annotator", "item_id", "scale_min", "scale_max"} <= set(r)
    assert isinstance(r["rating"], float) and (r["scale_min"], r["scale_max"]) == (1, 5)
    for p in got["pairs"]:
        assert {"prompt", "chosen", "rejected", "source", "annotator", "tie"} <= set(p)
    assert sum(p["source"] == "ranking" for p in got["pairs"]) == 3      # K(K-1)/2 for K = 3
    assert all(p["chosen"].endswith("!") for p in got["pairs"] if p["source"] == "edit")
    assert got["rankings"][0]["completions"] == ["good answer", "bad answer", "meh"]
    assert set(got["edits"][0]) >= {"prompt", "original", "edited", "annotator"}


def test_cleaning_normalises_whitespace_and_drops_empty_same_and_duplicates():
    assert normalize_ws("  a \u00a0 b\t\tc  \r\n\n\n\n    indented   x  ") == "a b c\n\n    indented x"
    recs = [{"prompt": " q ", "chosen": "A  b", "rejected": "c", "annotator": "u", "tie": False, "source": "pair"},
            {"prompt": "q", "chosen": "A b", "rejected": "c ", "annotator": "u", "tie": False, "source": "pair"},
            {"prompt": "q", "chosen": "same", "rejected": "same ", "annotator": "u", "tie": False, "source": "edit"},
            {"prompt": "q", "chosen": " ", "rejected": "c", "annotator": "u", "tie": False, "source": "pair"},
            {"prompt": "q", "chosen": "A b", "rejected": "c", "annotator": "v", "tie": False, "source": "pair"}]
    kept, dropped = clean(recs, "pairs")
    assert [(r["chosen"], r["annotator"]) for r in kept] == [("A b", "u"), ("A b", "v")]
    assert dropped == {"empty": 1, "same_text": 1, "duplicate": 1}


def test_hf_datasets_export(store, tmp_path):
    datasets = pytest.importorskip("datasets")
    store.import_samples(_samples("p", "a"))
    a = store.add_annotator("a")
    t = store.next_task(a)
    store.submit(a, t.item_id, {"kind": "rate", "rating": 2, "submission_id": t.submission_id})
    export(store, "default", tmp_path / "hf", kinds=["ratings"], fmt="hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf" / "ratings"))
    assert ds.num_rows == 1 and ds[0]["completion"] == "a" and ds[0]["rating"] == 2.0


# ---- simulated labelers --------------------------------------------------------------------------
def test_vader_raters_are_different_noisy_people():
    r0, r1 = VaderRater(seed=0), VaderRater(seed=1)
    texts = ["This movie was good, not great.", "I hate it. Terrible acting!", "An ok film I guess",
             "Wonderful, touching and funny", "bad"]
    u0 = [r0.score("", t) for t in texts]
    u1 = [r1.score("", t) for t in texts]
    assert u0 != u1                                     # two simulated people disagree somewhere ...
    assert u0[3] > 0 > u0[1] and u1[3] > 0 > u1[1]      # ... but both get the clear cases right
    t = Task(item_id=1, kind="rate", project="p", round=1, prompt="", samples=[{"id": 7, "text": texts[3]}],
             scale=(-4, 4))
    assert 0 < r0.answer(t)["rating"] <= 4


def test_bradley_terry_labeler_picks_with_sigmoid_probability():
    lab = BradleyTerryLabeler("rule:length", temperature=2.0, seed=0)
    t = Task(item_id=1, kind="pair", project="p", round=1, prompt="",
             samples=[{"id": 1, "text": "a b c"}, {"id": 2, "text": "a"}], scale=(1, 5))
    n = 4000
    wins = sum(lab.answer(t)["chosen"] == 1 for _ in range(n))
    p = 1 / (1 + math.exp(-(3 - 1) / 2.0))              # sigmoid((r_A - r_B) / T) = 0.731
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    cold = BradleyTerryLabeler("rule:length", temperature=0.0)
    assert all(cold.answer(t)["chosen"] == 1 for _ in range(20))


def test_run_labelers_over_a_round_then_export_and_agreement(store):
    from rlhfkit.feedback.agreement import store_agreement

    rng = random.Random(0)
    words = ["great", "awful", "fine", "wonderful", "bad", "boring", "love", "hate"]
    texts = [" ".join(rng.choice(words) for _ in range(3)) + f" {i}" for i in range(40)]
    store.import_samples([{"prompt": "", "completion": t} for t in texts], project="sent", kinds=("rate", "pair"),
                         overlap=3, scale=(-4, 4))
    for seed in range(3):
        assert run_labeler(store, make_labeler("vader-rater", seed=seed), project="sent", round=1) == 60
    rm = make_labeler("reward-model", reward="rule:length")
    assert run_labeler(store, rm, project="sent", round=1) == 0      # every slot is taken already
    assert store.count_labelled("sent", 1) == 60
    ag = store_agreement(store, "sent", 1)
    assert ag["ratings_units"] == 40 and 0.5 < ag["ratings_alpha_interval"] <= 1.0
    assert ag["pairs_units"] == 20 and ag["pairs_fleiss_kappa"] is not None
    with pytest.raises(ConfigError, match="unknown labeler"):
        make_labeler("oracle")


def test_reward_model_labeler_maps_the_rounds_scores_onto_the_scale(store):
    # rule:length scores 1..20 words; the 5th..95th percentile (1..19 words) spans the scale 1..5.
    texts = [" ".join(["w"] * n) for n in range(1, 21)]
    store.import_samples([{"prompt": "", "completion": t} for t in texts], project="len", scale=(1, 5))
    assert run_labeler(store, make_labeler("reward-model", reward="rule:length"), project="len") == 20
    got = {r["completion"].count("w"): r["rating"] for r in records(store, "len")["ratings"]}
    assert [got[n] for n in range(1, 21)] == sorted(got.values())       # monotonic in the score
    assert got[1] == 1 and got[10] == 3 and got[20] == 5                # 1 + 9/18 * 4 = 3


def test_opening_waits_while_another_connection_holds_a_new_database(tmp_path):
    """Two processes opening the same new SQLite database at once (a loop and an annotator's server): the
    second one's switch to WAL needs an exclusive lock, which SQLite refuses at once, busy handler or not.
    Store waits for it instead of failing with "database is locked"."""
    import sqlite3
    import threading

    path = tmp_path / "feedback.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # a write lock, as the first opener holds while it creates the tables
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    t0 = time.monotonic()
    store = Store(str(path))
    waited = time.monotonic() - t0
    release.join()
    other.close()
    assert waited >= 0.4  # it did wait for the other connection
    aid = store.add_annotator("alice", "pw-alice-123")
    assert store.add_annotator("bob", "pw-bob-12345") != aid
