"""`rlhfkit serve`: the official openai client works against it (plain and streaming), errors are clear,
and the chat page's thumbs and edits land in the feedback store (API and a real browser)."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

from rlhfkit.config import ModelConfig, ServeConfig
from rlhfkit.feedback.export import records
from rlhfkit.models.factory import build_model
from rlhfkit.serve.server import create_app
from rlhfkit.utils.checkpoint import save_model


class ThreadServer:
    """uvicorn serving an app on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.app = app
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(d / "model", build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=256),
                                        tiny_tokenizer), tiny_tokenizer)
    cfg = ServeConfig(model=str(d / "model"), name="tiny", feedback_db=str(d / "fb.db"), max_new_tokens=12,
                      max_tokens_limit=64, max_prompts=4, max_n=4, max_request_tokens=1024, max_body_kb=64)
    app = create_app(cfg)
    srv = ThreadServer(app)
    yield srv, app.state.store
    srv.stop()


def fb(store, kind: str) -> list[dict]:
    """The chat project's exported records of one kind (none before the first feedback)."""
    from rlhfkit.feedback.store import NotFound

    try:
        return records(store, "chat")[kind]
    except NotFound:
        return []


def client(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_completions_plain_vs_streamed(served):
    srv, _ = served
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    # Greedy decoding is deterministic: the streamed deltas must add up to the plain completion.
    plain = c.completions.create(model="tiny", prompt="The movie was", max_tokens=10, temperature=0)
    text = plain.choices[0].text
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.prompt_tokens > 0
    assert plain.usage.completion_tokens <= 10
    chunks = list(c.completions.create(model="tiny", prompt="The movie was", max_tokens=10, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    two = c.completions.create(model="tiny", prompt=["A", "B"], max_tokens=4, n=2, seed=1)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]


def test_chat_plain_vs_streamed_and_stop(served):
    srv, _ = served
    c = client(srv)
    msgs = [{"role": "user", "content": "Tell me about the film."}]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    answer = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True)
    deltas = [ch.choices[0].delta.content or "" for ch in stream]
    assert "".join(deltas) == answer
    if len(answer) > 3:  # a stop string cuts the answer before it
        stop = answer[2:4]
        cut = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == answer[:answer.index(stop)]


def test_bad_requests_get_openai_style_errors(served):
    from openai import BadRequestError

    srv, _ = served
    c = client(srv)
    with pytest.raises(BadRequestError, match="exceeds the server's limit of 64"):
        c.completions.create(model="tiny", prompt="x", max_tokens=1000)
    with pytest.raises(BadRequestError, match="messages.0.role"):
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 20001})
    assert r.status_code == 400 and "limit is 20000" in r.json()["error"]["message"]


def chat_session(srv) -> tuple[httpx.Client, str]:
    """A client holding a chat page session (its cookie), and that session's CSRF token."""
    c = httpx.Client(base_url=srv.url)
    token = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
    return c, token


def test_feedback_needs_csrf_and_same_origin(served):
    srv, store = served
    before = len(fb(store, "ratings"))
    body = {"messages": [{"role": "user", "content": "hi"}], "completion": "hello", "rating": 1}
    assert httpx.post(srv.url + "/feedback/rate", json=body).status_code == 403
    c, token = chat_session(srv)
    forged = c.post("/feedback/rate", json=body, headers={"x-csrf-token": token, "origin": "http://evil.example"})
    assert forged.status_code == 403
    assert c.post("/feedback/rate", json={**body, "rating": 5}, headers={"x-csrf-token": token}).status_code == 400
    assert len(fb(store, "ratings")) == before  # nothing stored by refused requests
    ok = c.post("/feedback/rate", json=body, headers={"x-csrf-token": token})
    assert ok.status_code == 200 and ok.json()["stored"]
    rows = fb(store, "ratings")
    assert len(rows) == before + 1
    assert rows[-1]["completion"] == "hello" and rows[-1]["rating"] == 1
    assert rows[-1]["prompt"].startswith("<|user|>\nhi")  # the chat-templated text the model saw


def test_chat_feedback_identity_is_issued_by_the_server(served):
    """Issue 24: the CSRF token was one per process, readable by anyone with GET /, and the user came
    from a cookie the client set, so `rk_chat_user=boss` wrote a rating as the human admin boss."""
    srv, store = served
    store.add_annotator("boss", "boss-password", admin=True, exist_ok=True)
    body = {"messages": [{"role": "user", "content": "hi"}], "completion": "hello there", "rating": 0}
    a, token_a = chat_session(srv)
    _, token_b = chat_session(srv)
    assert token_a != token_b                        # a token per session, not per process
    # B's token does not work with A's session, nor a token without any session.
    assert a.post("/feedback/rate", json=body, headers={"x-csrf-token": token_b}).status_code == 403
    r = httpx.post(srv.url + "/feedback/rate", json=body, headers={"x-csrf-token": token_a},
                   cookies={"rk_chat_user": "boss"})
    assert r.status_code == 403 and "session" in r.json()["error"]["message"]
    # A forged session cookie is refused too.
    forged = httpx.post(srv.url + "/feedback/rate", json=body, headers={"x-csrf-token": token_a},
                        cookies={"rk_chat": a.cookies["rk_chat"][:-2] + "xx", "rk_chat_user": "boss"})
    assert forged.status_code == 403
    a.cookies.set("rk_chat_user", "boss")              # a cookie the client sets names no one
    assert a.post("/feedback/rate", json=body, headers={"x-csrf-token": token_a}).status_code == 200
    names = {x["name"]: x["kind"] for x in store.annotators()}
    assert names["boss"] == "human"
    rows = [x for x in fb(store, "ratings") if x["completion"] == "hello there"]
    assert len(rows) == 1 and rows[0]["annotator"].startswith("chat-") and names[rows[0]["annotator"]] == "user"
    # Even the store itself never maps a chat user onto an annotator account.
    from rlhfkit.feedback.store import Forbidden

    with pytest.raises(Forbidden):
        store.record_rating("p", "c", 1, user="boss", project="chat", scale=(0, 1))


@pytest.mark.browser
def test_thumbs_up_and_edit_in_the_chat_page_land_in_the_store(served, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM_FLAGS

    srv, store = served
    n_ratings, n_edits = len(fb(store, "ratings")), len(fb(store, "edits"))
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.goto(srv.url + "/")
        page.fill("#input", "Write a happy review.")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30000)
        answer = page.inner_text(".msg.assistant .bubble")
        page.click(".msg.assistant .thumb-up")
        page.wait_for_selector("text=Thanks, saved.", timeout=10000)
        page.click(".msg.assistant .edit")
        page.fill(".editor textarea", "What a wonderful film!")
        page.click(".editor .save")
        page.wait_for_selector("text=Edit saved.", timeout=10000)
        import os
        from pathlib import Path

        shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
        browser.close()
    assert not problems, problems
    ratings, edits = fb(store, "ratings"), fb(store, "edits")
    assert len(ratings) == n_ratings + 1 and len(edits) == n_edits + 1
    assert ratings[-1]["rating"] == 1 and ratings[-1]["completion"] == answer.strip()
    assert edits[-1]["edited"] == "What a wonderful film!"
    assert "Write a happy review." in ratings[-1]["prompt"]


# ---------------------------------------------------------------------------------------------------
# Issue 24: bounded work per request, no 500s, correct usage, fair turns, timeouts
# ---------------------------------------------------------------------------------------------------
def err(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def test_every_limit_is_enforced_with_a_4xx_naming_it(served):
    srv, _ = served
    post = lambda path, body: httpx.post(srv.url + path, json=body, timeout=30)
    r = post("/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 1})
    assert r.status_code == 400 and "max_prompts" in err(r)
    r = post("/v1/completions", {"prompt": "a", "n": 5, "max_tokens": 1})
    assert r.status_code == 400 and "max_n" in err(r)
    # Total work (max_request_tokens=1024): 4 prompts x n=4 x 2 tokens + prompts is fine, ...
    assert post("/v1/completions", {"prompt": ["a"] * 4, "n": 4, "max_tokens": 2}).status_code == 200
    # ... but the limit counts the conversation after the chat template: 700 empty messages are no text,
    # yet several tokens each once templated.
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 700, "max_tokens": 1})
    assert r.status_code == 400 and "max_request_tokens" in err(r) and "after templating" in err(r)
    r = post("/v1/completions", {"prompt": ["a b c"] * 4, "n": 4, "max_tokens": 64})  # 4 x 4 x 64 + prompts
    assert r.status_code == 400 and "max_request_tokens" in err(r) and "4 prompt(s) x n=4 x max_tokens=64" in err(r)
    # The model's context (256 positions) bounds prompt + max_tokens.
    r = post("/v1/completions", {"prompt": "word " * 240, "max_tokens": 64})
    assert r.status_code == 400 and "context of 256" in err(r)
    # Body bytes: announced (Content-Length) or chunked, both 413 before anything is parsed.
    big = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    r = httpx.post(srv.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "64 KiB" in err(r)
    r = httpx.post(srv.url + "/v1/completions", content=iter([big[:40_000], big[40_000:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "transfer-encoding" not in r.request.headers.get("content-length", "")


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "max_tokens": 2, "seed": 18446744073709551616}',         # 2**64
    b'{"prompt": "x", "max_tokens": 2, "seed": 1000000000000000000000000000000}',
    b'{"prompt": "x", "max_tokens": 2, "seed": -1}',
    b'{"prompt": "\\ud800", "max_tokens": 2}',                                  # a lone surrogate
    b'{"prompt": ["ok", "bad \\udfff"], "max_tokens": 2}',
    b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}',
    b'{"prompt": "x", "max_tokens": 2, "temperature": 1e400}',
    b'{"prompt": "x", "max_tokens": 2, "n": 100000000000000000000}',
    b'{"prompt": "x", "max_tokens": 100000000000000000000}',
    b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}',
    b'{"prompt": "x", "stop": [""]}',
    b'{"prompt": "\xff\xfe"}',                                                  # not UTF-8
    b'[' * 100_000 + b']' * 100_000,
    b'{"prompt": ' + b'[' * 50 + b'"x"' + b']' * 50 + b'}',
    b'"just a string"',
])
@pytest.mark.parametrize("stream", [False, True])
def test_hostile_input_gets_400_not_500(served, raw, stream):
    srv, _ = served
    if stream and raw.startswith(b"{"):
        raw = raw[:-1] + b', "stream": true}'
    r = httpx.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text
    assert r.headers["content-type"].startswith("application/json") and err(r)


def test_hostile_chat_input_and_a_streamed_huge_seed(served):
    srv, _ = served
    msgs = [{"role": "user", "content": "hi \ud800"}]
    r = httpx.post(srv.url + "/v1/chat/completions", content=json.dumps({"messages": msgs}).encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "messages.0.content" in err(r) and "Unicode" in err(r)
    # Before: a 200 whose stream ended with no data.
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "stream": True, "seed": 2 ** 64})
    assert r.status_code == 400 and err(r).startswith("seed")


def test_usage_counts_the_tokens_generated(served):
    srv, _ = served
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": ["The film", "A book"], "n": 3, "max_tokens": 20,
                                                      "temperature": 1.5, "seed": 3}, timeout=60).json()
    usage = r["usage"]
    assert usage["completion_tokens"] <= 2 * 3 * 20
    lengths = [20 if c["finish_reason"] == "length" else None for c in r["choices"]]
    if all(lengths):
        assert usage["completion_tokens"] == 120
    # Greedy, no EOS in reach: each of the n samples is exactly max_tokens long.
    g = httpx.post(srv.url + "/v1/completions", json={"prompt": "The film", "n": 2, "max_tokens": 16,
                                                      "temperature": 0}, timeout=60).json()
    if all(c["finish_reason"] == "length" for c in g["choices"]):
        assert g["usage"]["completion_tokens"] == 32
    assert g["usage"]["total_tokens"] == g["usage"]["prompt_tokens"] + g["usage"]["completion_tokens"]


def test_turn_queue_serves_in_arrival_order_and_times_out():
    from rlhfkit.serve.server import RequestError, TurnQueue

    q, order, started = TurnQueue(), [], []
    hold = threading.Event()

    def worker(name: str, pieces: int) -> None:
        for _ in range(pieces):
            with q.turn(time.monotonic() + 30):
                started.append(name)
                if name == "big" and len(started) == 1:
                    hold.wait(10)
                order.append(name)

    big = threading.Thread(target=worker, args=("big", 3))
    big.start()
    while not started:
        time.sleep(0.005)
    small = threading.Thread(target=worker, args=("small", 1))
    small.start()
    while len(q.waiting) < 1:
        time.sleep(0.005)
    hold.set()
    big.join(10), small.join(10)
    # The large caller queued again after its first piece: the small one went next, not last.
    assert order == ["big", "small", "big", "big"]
    with q.turn(time.monotonic() + 5):
        t0 = time.monotonic()
        with pytest.raises(RequestError) as e, q.turn(time.monotonic() + 0.2):
            pass
        assert e.value.status == 503 and time.monotonic() - t0 >= 0.2
    assert not q.waiting and not q.busy


def test_a_small_request_is_not_starved_by_a_large_one(served):
    """Issue 24: a 4-token request waited behind a large one for its whole run (one global lock)."""
    srv, _ = served
    done: dict[str, float] = {}

    def run(name: str, body: dict) -> None:
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    big = threading.Thread(target=run, args=("big", {"prompt": ["The film", "A book", "My day", "Our trip"],
                                                     "n": 3, "max_tokens": 64, "temperature": 1.0}))
    queue = srv.app.state.engine.queue
    big.start()
    deadline = time.monotonic() + 30
    while not queue.busy and time.monotonic() < deadline:   # the large request's first turn has begun
        time.sleep(0.001)
    t0 = time.monotonic()
    run("small", {"prompt": "Hi", "max_tokens": 4})
    big.join(120)
    # Served between the large request's turns, not after all of them.
    assert done["small"] < done["big"], (done["small"] - t0, done["big"] - t0)


def test_seeded_requests_repeat_whatever_runs_in_between(served):
    srv, _ = served
    body = {"prompt": ["The film", "A book"], "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    alone = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    noise = threading.Thread(target=lambda: [httpx.post(srv.url + "/v1/completions", timeout=60,
                                                        json={"prompt": "x", "max_tokens": 4, "temperature": 1.0})
                                             for _ in range(4)])
    noise.start()
    again = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    noise.join(60)
    assert [c["text"] for c in again] == [c["text"] for c in alone]


def test_request_timeout_gives_503(served):
    srv, _ = served
    from rlhfkit.serve.server import create_app as make

    engine = srv.app.state.engine
    cfg = ServeConfig(model="unused", name="tiny", feedback_db="", max_new_tokens=4, max_tokens_limit=64,
                      request_timeout_s=0.3)
    other = ThreadServer(make(cfg, engine=engine))
    try:
        with engine.queue.turn(time.monotonic() + 30):     # the model is busy for longer than the timeout
            r = httpx.post(other.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert r.status_code == 503 and "request_timeout_s" in err(r) and r.headers["retry-after"]
            s = httpx.post(other.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True},
                           timeout=30)
            assert s.status_code == 200
            events = [line for line in s.text.splitlines() if line.startswith("data: ")]
            assert "request_timeout_s" in events[-1] and "[DONE]" not in s.text
    finally:
        other.stop()


def test_openapi_has_request_bodies_statuses_and_the_chat_session(served):
    srv, _ = served
    spec = httpx.get(srv.url + "/openapi.json").json()
    for path, body in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatRequest"),
                       ("/feedback/rate", "RateIn"), ("/feedback/edit", "EditIn")):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert {"200", "400", "413"} <= set(op["responses"])
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "503" in spec["paths"]["/v1/completions"]["post"]["responses"]
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert spec["paths"]["/feedback/rate"]["post"]["security"] == [{"chatSession": [], "csrfHeader": []}]
    assert spec["components"]["securitySchemes"]["chatSession"]["in"] == "cookie"
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2 ** 63 - 1


def test_a_stream_that_fails_midway_ends_with_an_error_event(served, monkeypatch):
    srv, _ = served
    engine = srv.app.state.engine

    def broken(*a, **k):
        yield "partial"
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "stream", broken)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(events[0])["choices"][0]["text"] == "partial"
    assert json.loads(events[-1])["error"]["type"] == "server_error" and "[DONE]" not in events
