"""20 annotator clients x 500 answers each against a real server on 127.0.0.1: every answer is stored
exactly once, also when clients resend a request (as they do after a timeout)."""
from __future__ import annotations

import http.client
import json
import random
import threading
import time

import pytest
from sqlalchemy import func, select

from rlhfkit.feedback.store import Assignment, Rating, Store, Submission
from tests.feedback_server import LiveServer


class Client:
    """One annotator: a keep-alive HTTP connection and a bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=self.headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read() or b"null")


@pytest.mark.slow
def test_20_clients_x_500_answers_stored_exactly_once(tmp_path):
    # About 80 s on 2 busy cores (docs/benchmarks.md).
    run_load(tmp_path, clients=20, per_client=500)


def test_8_clients_x_25_answers_stored_exactly_once(tmp_path):
    run_load(tmp_path, clients=8, per_client=25)


def run_load(tmp_path, clients: int, per_client: int) -> None:
    CLIENTS, PER_CLIENT = clients, per_client
    db = tmp_path / "fb.db"
    st = Store(str(db))
    st.import_samples([{"prompt": f"prompt {i}", "completion": f"completion {i}"} for i in range(PER_CLIENT)],
                      project="load", kinds=("rate",), overlap=CLIENTS)
    tokens = []
    for c in range(CLIENTS):
        st.add_annotator(f"client{c:02d}")
        tokens.append(st.new_token(f"client{c:02d}"))
    server = LiveServer(str(db))
    sent: list[list[str]] = [[] for _ in range(CLIENTS)]
    resent = [0] * CLIENTS
    errors: list[str] = []

    def work(c: int) -> None:
        rng = random.Random(c)
        cl = Client(server.port, tokens[c])
        try:
            for _ in range(PER_CLIENT + 1):               # bounded: one more call must find nothing left
                status, body = cl.call("GET", "/api/v1/tasks/next")
                task = body["task"]
                if task is None:
                    break
                answer = {"kind": "rate", "rating": rng.randint(1, 5), "submission_id": task["submission_id"]}
                path = f"/api/v1/tasks/{task['item_id']}/answer"
                status, body = cl.call("POST", path, answer)
                if status != 201 or body["duplicate"]:
                    errors.append(f"client {c}: {status} {body}")
                    return
                sent[c].append(task["submission_id"])
                if rng.random() < 0.05:                    # a retry of the same request
                    status, body = cl.call("POST", path, answer)
                    if status != 200 or not body["duplicate"]:
                        errors.append(f"client {c}: resend got {status} {body}")
                        return
                    resent[c] += 1
        except Exception as e:  # noqa: BLE001 (reported below with the client number)
            errors.append(f"client {c}: {type(e).__name__}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=work, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.time() - t0
    server.stop()
    assert not errors, errors[:5]
    n = CLIENTS * PER_CLIENT
    print(f"\n{n} answers (+{sum(resent)} resends) from {CLIENTS} clients in {elapsed:.1f} s "
          f"= {n / elapsed:.0f} answers/s")
    assert all(len(s) == PER_CLIENT for s in sent)
    uids = [u for s in sent for u in s]
    assert len(set(uids)) == n
    with st.read() as s:
        stored = s.scalars(select(Submission.uid)).all()
        assert sorted(stored) == sorted(uids)              # each sent answer stored exactly once
        assert s.scalar(select(func.count()).select_from(Rating)) == n
        per_item = s.execute(select(Submission.item_id, func.count()).group_by(Submission.item_id)).all()
        assert len(per_item) == PER_CLIENT and {c for _, c in per_item} == {CLIENTS}
        assert s.scalar(select(func.count()).select_from(Assignment).where(Assignment.status == "done")) == n
    assert st.count_labelled("load", 1) == PER_CLIENT
