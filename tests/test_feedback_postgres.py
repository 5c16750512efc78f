"""The store on PostgreSQL (runs when RLHFKIT_TEST_PG_URL points at an empty test database, e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/rlhfkit_test; it drops every table it made at the end).

Concurrent claims from threads must never give an item to more than `overlap` annotators (row locks with
SKIP LOCKED), and resent answers are stored once."""
from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import func, select

from rlhfkit.errors import ConfigError
from rlhfkit.feedback import migrate
from rlhfkit.feedback.export import records
from rlhfkit.feedback.store import Store, Submission

URL = os.environ.get("RLHFKIT_TEST_PG_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="set RLHFKIT_TEST_PG_URL to test PostgreSQL")


@pytest.fixture
def pg():
    with pytest.raises(ConfigError, match="db upgrade"):     # never migrated behind the user's back
        Store(URL)
    st = Store(URL, upgrade="skip")
    migrate.upgrade(st)
    yield Store(URL)
    migrate.downgrade(st, "base")
    st.close()


def test_postgres_claims_answers_and_export(pg):
    overlap, n_items, n_people = 3, 40, 8
    pg.import_samples([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n_items)], project="pg",
                      kinds=("rate",), overlap=overlap)
    people = [pg.add_annotator(f"u{i}") for i in range(n_people)]
    errors: list[str] = []

    def work(a: int) -> None:
        try:
            while (t := pg.next_task(a)) is not None:
                answer = {"kind": "rate", "rating": 1 + a % 5, "submission_id": t.submission_id}
                assert not pg.submit(a, t.item_id, answer).duplicate
                assert pg.submit(a, t.item_id, answer).duplicate          # a resend
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(a,)) for a in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    with pg.read() as s:
        per_item = dict(s.execute(select(Submission.item_id, func.count()).group_by(Submission.item_id)).all())
    assert len(per_item) == n_items and set(per_item.values()) == {overlap}
    assert pg.count_labelled("pg", 1) == n_items
    assert len(records(pg, "pg")["ratings"]) == n_items * overlap
    pg.record_edit("hi", "yo", "Hello!", user="web:1")
    assert records(pg, "chat")["edits"][0]["edited"] == "Hello!"


def test_postgres_releases_stale_claims(pg):
    """Timestamps are zone-aware in PostgreSQL: the age cut-off must compare right there too."""
    import time

    pg.import_samples([{"prompt": "p", "completion": "c"}], project="pg", kinds=("rate",), overlap=1)
    a, b = pg.add_annotator("a"), pg.add_annotator("b")
    t = pg.next_task(a)
    assert pg.next_task(b) is None
    assert pg.release_stale("pg", None, older_than_s=3600) == 0
    time.sleep(0.05)
    assert pg.release_stale("pg", None, older_than_s=0.01) == 1
    assert pg.next_task(b).item_id == t.item_id
