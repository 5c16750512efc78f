"""`rlhfkit serve`: the official openai client works against it (plain and streaming), errors are clear,
and the chat page's thumbs and edits land in the feedback store (API and a real browser)."""
from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
import torch

from rlhfkit.config import ModelConfig, ServeConfig
from rlhfkit.feedback.export import records
from rlhfkit.feedback.store import Store
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
                      max_tokens_limit=64)
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


def test_feedback_needs_csrf_and_same_origin(served):
    srv, store = served
    before = len(fb(store, "ratings"))
    body = {"messages": [{"role": "user", "content": "hi"}], "completion": "hello", "rating": 1}
    assert httpx.post(srv.url + "/feedback/rate", json=body).status_code == 403
    page = httpx.get(srv.url + "/").text
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    forged = httpx.post(srv.url + "/feedback/rate", json=body,
                        headers={"x-csrf-token": token, "origin": "http://evil.example"})
    assert forged.status_code == 403
    assert httpx.post(srv.url + "/feedback/rate", json={**body, "rating": 5},
                      headers={"x-csrf-token": token}).status_code == 400
    assert len(fb(store, "ratings")) == before  # nothing stored by refused requests
    ok = httpx.post(srv.url + "/feedback/rate", json=body, headers={"x-csrf-token": token})
    assert ok.status_code == 200 and ok.json()["stored"]
    rows = fb(store, "ratings")
    assert len(rows) == before + 1
    assert rows[-1]["completion"] == "hello" and rows[-1]["rating"] == 1
    assert rows[-1]["prompt"].startswith("<|user|>\nhi")  # the chat-templated text the model saw


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
