"""The web app and JSON API in-process: logins, CSRF, escaping, and bad input refused with a clear 4xx
that changes nothing in the database."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhfkit.feedback.app import LoginThrottle, Settings, create_app, sign, unsign
from rlhfkit.feedback.store import Base, Store


@pytest.fixture
def env(tmp_path):
    st = Store(str(tmp_path / "fb.db"), max_text_chars=1000)
    st.import_samples([{"prompt": "Say hi", "completion": "hello <b>there</b>"}], kinds=("rate", "edit"))
    st.import_samples([{"prompt": "Pick", "completion": c} for c in ("one", "two")], round=1, kinds=("pair",))
    st.add_annotator("alice", "alice-password")
    st.add_annotator("bob", "bob-password")
    st.add_annotator("root", "root-password", admin=True)
    tokens = {n: st.new_token(n) for n in ("alice", "bob", "root")}
    app = create_app(st, Settings(max_body_kb=64))
    yield st, TestClient(app), tokens
    st.close()


def snapshot(st: Store) -> dict:
    """Row counts of every table plus every assignment's status: "nothing changed" means equal snapshots."""
    with st.read() as s:
        counts = {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
        counts["statuses"] = sorted(s.execute(select(Base.metadata.tables["assignments"].c.status)).scalars())
    return counts


def login(client: TestClient, name: str, password: str) -> str:
    page = client.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/login", data={"name": name, "password": password, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf


def task_form(client: TestClient) -> dict:
    page = client.get("/task").text
    grab = lambda n: re.search(rf'name="{n}" value="([^"]*)"', page).group(1)
    return {"csrf": grab("csrf"), "submission_id": grab("submission_id"), "kind": grab("kind"),
            "item": int(re.search(r'action="/task/(\d+)"', page).group(1)), "html": page}


def test_login_throttle_window():
    now = [0.0]
    t = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    for dt in (0, 10, 20):
        now[0] = dt
        assert t.wait_s("alice") == 0
        t.failed("alice")
    assert t.wait_s("alice") == pytest.approx(40)        # the first failure (t=0) leaves the window at 60
    assert t.wait_s("bob") == 0                          # other keys are not affected
    now[0] = 60.5
    assert t.wait_s("alice") == 0                        # two failures left in the window
    t.failed("alice")
    assert t.wait_s("alice") == pytest.approx(10 - 0.5)  # the t=10 one leaves at 70
    t.clear("alice")
    assert t.wait_s("alice") == 0


def test_password_guessing_gets_429_and_a_success_is_still_refused_meanwhile(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    st.add_annotator("alice", "alice-password")
    st.add_annotator("bob", "bob-password")
    c = TestClient(create_app(st, Settings(login_max_failures=3)))
    page = c.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    post = lambda n, p: c.post("/login", data={"name": n, "password": p, "csrf": csrf},
                               follow_redirects=False)
    assert [post("alice", f"guess-{i}").status_code for i in range(3)] == [401, 401, 401]
    r = post("alice", "alice-password")                 # right password, but alice is locked for now
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "Too many failed logins" in r.text
    assert post("bob", "bob-password").status_code == 303   # the address has 5x the room: bob gets in
    st.close()


def test_a_new_password_ends_the_old_sessions(env):
    st, c, _ = env
    login(c, "alice", "alice-password")
    assert c.get("/task", follow_redirects=False).status_code == 200
    st.set_password("alice", "alice-new-password")           # e.g. `rlhfkit feedback users passwd alice`
    assert c.get("/task", follow_redirects=False).headers["location"] == "/login"
    login(c, "alice", "alice-new-password")
    assert c.get("/task", follow_redirects=False).status_code == 200


def test_login_session_and_escaping(env):
    _, c, _ = env
    assert c.get("/task", follow_redirects=False).headers["location"] == "/login"
    page = c.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert c.post("/login", data={"name": "alice", "password": "wrong-password", "csrf": csrf}).status_code == 401
    assert c.post("/login", data={"name": "alice", "password": "alice-password", "csrf": "forged"}).status_code == 403
    login(c, "alice", "alice-password")
    f = task_form(c)
    assert "hello &lt;b&gt;there&lt;/b&gt;" in f["html"] and "<b>there" not in f["html"]
    r = c.get("/task")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    cookie = c.cookies.get("rk_session")
    assert unsign(b"k", sign(b"k", {"a": 1, "exp": 9e9})) == {"a": 1, "exp": 9e9}
    assert unsign(b"k", sign(b"other key", {"a": 1, "exp": 9e9})) is None
    assert unsign(b"k", sign(b"k", {"a": 1, "exp": 1})) is None          # expired
    c.cookies.clear()
    c.cookies.set("rk_session", cookie)                                   # control: the real cookie works
    assert c.get("/task", follow_redirects=False).status_code == 200
    c.cookies.clear()
    c.cookies.set("rk_session", cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB"))  # tampered
    assert c.get("/task", follow_redirects=False).headers["location"] == "/login"


def test_form_flow_rate_then_forged_and_bad_forms_change_nothing(env):
    st, c, _ = env
    login(c, "alice", "alice-password")
    f = task_form(c)
    assert f["kind"] == "rate"
    before = snapshot(st)
    base = {"csrf": f["csrf"], "submission_id": f["submission_id"], "kind": "rate"}
    bad = [({**base, "csrf": "forged", "rating": "3"}, 403),                 # forged form
           ({k: v for k, v in base.items() if k != "csrf"} | {"rating": "3"}, 403),   # no token
           ({**base, "rating": "9"}, 422),                                   # off the scale
           ({**base, "rating": "three"}, 422),
           ({**base, "rating": "3", "comment": "x" * 1001}, 422),            # over max_text_chars
           ({**base, "submission_id": "../../etc", "rating": "3"}, 422)]
    for data, status in bad:
        r = c.post(f"/task/{f['item']}", data=data, follow_redirects=False)
        assert r.status_code == status, (data, r.text)
    r = c.post(f"/task/{f['item']}", data={**base, "rating": "3"}, headers={"origin": "http://evil.example"},
               follow_redirects=False)
    assert r.status_code == 403                                              # cross-site post
    r = c.post("/task/999", data={**base, "rating": "3"})
    assert r.status_code == 404 and "no task 999" in r.text
    assert snapshot(st) == before
    r = c.post(f"/task/{f['item']}", data={**base, "rating": "3"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/task?m=saved"
    r = c.post(f"/task/{f['item']}", data={**base, "rating": "3"}, follow_redirects=False)   # double click
    assert r.status_code == 303
    after = snapshot(st)
    assert after["submissions"] == before["submissions"] + 1 and after["ratings"] == 1
    # Wrong annotator: bob posts to the task alice holds.
    c2 = TestClient(c.app)
    login(c2, "bob", "bob-password")
    fb = task_form(c2)
    r = c2.post(f"/task/{f['item']}", data={"csrf": fb["csrf"], "submission_id": "bob-try-0001", "kind": "rate",
                                            "rating": "1"})
    assert r.status_code == 403 and "not assigned to you" in r.text
    assert snapshot(st)["submissions"] == after["submissions"]
    # Admin view is for admins.
    assert c2.get("/admin").status_code == 403


def test_edit_page_refuses_bad_text_and_keeps_it(env):
    st, c, _tokens = env
    login(c, "alice", "alice-password")
    f = task_form(c)
    c.post(f"/task/{f['item']}", data={"csrf": f["csrf"], "submission_id": f["submission_id"], "kind": "rate",
                                       "rating": "4"})
    f = task_form(c)
    assert f["kind"] == "edit"
    before = snapshot(st)
    r = c.post(f"/task/{f['item']}", data={"csrf": f["csrf"], "submission_id": f["submission_id"], "kind": "edit",
                                           "edited": "Hi <script>steal()</script>" + "x" * 1000})
    assert r.status_code == 422 and "limit is 1000" in r.text
    assert "Hi &lt;script&gt;steal()&lt;/script&gt;" in r.text               # shown back, escaped
    assert snapshot(st) == before
    r = c.post(f"/task/{f['item']}", data={"csrf": f["csrf"], "submission_id": f["submission_id"], "kind": "edit",
                                           "action": "skip"}, follow_redirects=False)
    assert r.headers["location"] == "/task?m=skipped"
    r = c.post("/undo", data={"csrf": f["csrf"]}, follow_redirects=False)
    assert r.headers["location"] == "/task?m=undone"
    assert task_form(c)["item"] == f["item"]


def test_json_api_auth_answers_and_bad_input(env):
    st, c, tokens = env
    h = {"Authorization": f"Bearer {tokens['alice']}"}
    assert c.get("/api/v1/tasks/next").status_code == 401
    assert c.get("/api/v1/tasks/next", headers={"Authorization": "Bearer rk_nope"}).status_code == 401
    task = c.get("/api/v1/tasks/next", headers=h, params={"kind": "pair"}).json()["task"]
    assert task["kind"] == "pair" and [s["text"] for s in task["samples"]] == ["one", "two"]
    before = snapshot(st)
    url = f"/api/v1/tasks/{task['item_id']}/answer"
    sid = task["submission_id"]
    bad = [({"kind": "pair", "chosen": 12345, "submission_id": sid}, 422),
           ({"kind": "pair", "submission_id": sid, "extra": 1}, 422),
           ({"kind": "judge", "submission_id": sid}, 422),
           ({"kind": "pair", "tie": True, "submission_id": sid, "comment": "y" * 1001}, 422)]
    for body, status in bad:
        r = c.post(url, json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert r.json()["detail"]
    r = c.post(url, content=b"{" + b" " * 70_000 + b"}", headers={**h, "content-type": "application/json"})
    assert r.status_code == 413                                        # over max_body_kb
    r = c.post(url, json={"kind": "pair", "tie": True, "submission_id": sid},
               headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert r.status_code == 403                                        # wrong annotator
    r = c.post("/api/v1/tasks/4242/answer", json={"kind": "pair", "tie": True, "submission_id": sid}, headers=h)
    assert r.status_code == 404
    assert snapshot(st) == before
    chosen = task["samples"][1]["id"]
    r = c.post(url, json={"kind": "pair", "chosen": chosen, "submission_id": sid, "comment": "clearer"}, headers=h)
    assert r.status_code == 201 and r.json()["duplicate"] is False
    r = c.post(url, json={"kind": "pair", "chosen": chosen, "submission_id": sid}, headers=h)
    assert r.status_code == 200 and r.json()["duplicate"] is True
    me = c.get("/api/v1/me", headers=h).json()
    assert me["name"] == "alice" and me["progress"]["done"] == 1
    assert c.post("/api/v1/undo", headers=h).json() == {"item_id": task["item_id"]}
    assert c.get("/api/v1/admin/stats", headers=h).status_code == 403
    stats = c.get("/api/v1/admin/stats", headers={"Authorization": f"Bearer {tokens['root']}"}).json()
    assert stats["rounds"][0]["items"] == {"edit": 1, "pair": 1, "rate": 1}


def test_openapi_spec_lists_the_api(env):
    _, c, tokens = env
    spec = c.get("/openapi.json").json()
    assert {"/api/v1/tasks/next", "/api/v1/tasks/{item_id}/answer", "/api/v1/tasks/{item_id}/skip",
            "/api/v1/undo", "/api/v1/progress", "/api/v1/me", "/api/v1/admin/stats"} <= set(spec["paths"])
    body = spec["paths"]["/api/v1/tasks/{item_id}/answer"]["post"]["requestBody"]
    assert "discriminator" in str(body) or "oneOf" in str(spec["components"])
    assert c.get("/docs").status_code == 404                           # no CDN-loaded Swagger page
    r = c.get("/api/v1/admin/export/default/ratings", headers={"Authorization": f"Bearer {tokens['root']}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")


# ---------------------------------------------------------------------------------------------------
# Issue 24: no 500s on hostile input, login throttling nobody can turn into a lockout, sessions that
# end on the server, 413 for chunked bodies, bidi-safe text, a total that does not shrink
# ---------------------------------------------------------------------------------------------------
def test_api_hostile_numbers_and_text_get_4xx_with_a_string_detail(env):
    st, c, tokens = env
    h = {"Authorization": f"Bearer {tokens['alice']}", "content-type": "application/json"}
    task = c.get("/api/v1/tasks/next", headers=h, params={"kind": "rate"}).json()["task"]
    url, sid = f"/api/v1/tasks/{task['item_id']}/answer", task["submission_id"]
    edit = c.get("/api/v1/tasks/next", headers=h, params={"kind": "edit"}).json()["task"]
    before = snapshot(st)
    raw = [b'{"kind": "rate", "rating": NaN, "submission_id": "%s"}',
           b'{"kind": "rate", "rating": 1e400, "submission_id": "%s"}',
           b'{"kind": "rate", "rating": -Infinity, "submission_id": "%s"}',
           b'{"kind": "rate", "rating": 3, "comment": "\\ud800", "submission_id": "%s"}',
           b'{"kind": "rate", "rating": 3, "submission_id": "%s"' + b', "x": [' * 5000 + b']' * 5000 + b'}']
    for body in raw:
        r = c.post(url, content=body.replace(b"%s", sid.encode()), headers=h)
        assert r.status_code in (400, 422), (body[:60], r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert "not valid Unicode" in c.post(url, content=raw[3].replace(b"%s", sid.encode()), headers=h).json()["detail"]
    r = c.post(f"/api/v1/tasks/{task['item_id']}/comments", content=b'{"text": "bad \\udfff"}', headers=h)
    assert r.status_code == 422 and "not valid Unicode" in r.json()["detail"]
    r = c.post(f"/api/v1/tasks/{edit['item_id']}/answer", headers=h,
               content=b'{"kind": "edit", "edited": "x \\ud800 y", "submission_id": "%s"}' % edit["submission_id"].encode())
    assert r.status_code == 422 and r.json()["detail"].endswith("edited: text is not valid Unicode (a lone UTF-16 surrogate)")
    # Ids past 64 bits: answer, skip and comment, each with three sizes.
    for big in (2 ** 63, 2 ** 64, 10 ** 30):
        for path, body in ((f"/api/v1/tasks/{big}/answer", {"kind": "rate", "rating": 3, "submission_id": sid}),
                           (f"/api/v1/tasks/{big}/skip", None), (f"/api/v1/tasks/{big}/comments", {"text": "hi"})):
            r = c.post(path, json=body, headers=h) if body else c.post(path, headers=h)
            assert r.status_code == 422 and isinstance(r.json()["detail"], str), (path, r.text)
    assert snapshot(st) == before
    # The form pages too.
    login(c, "alice", "alice-password")
    f = task_form(c)
    before = snapshot(st)
    r = c.post(f"/task/{2 ** 63}", data={"csrf": f["csrf"], "submission_id": f["submission_id"], "kind": "rate",
                                         "rating": "3"})
    assert r.status_code == 404 and f"no task {2 ** 63}" in r.text
    assert snapshot(st) == before


def test_chunked_body_over_the_limit_gets_413(env):
    _, c, tokens = env
    h = {"Authorization": f"Bearer {tokens['alice']}", "content-type": "application/json"}
    body = b'{"text": "' + b"x" * 70_000 + b'"}'
    r = c.post("/api/v1/tasks/1/comments", content=iter([body[:30_000], body[30_000:]]), headers=h)
    assert "content-length" not in r.request.headers                  # sent chunked
    assert r.status_code == 413 and "64 KiB" in r.json()["detail"]


def _login_from(app, addr: str, name: str, password: str, headers: dict | None = None) -> int:
    c = TestClient(app, client=(addr, 5000), headers=headers or {})
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    return c.post("/login", data={"name": name, "password": password, "csrf": csrf},
                  follow_redirects=False).status_code


def test_failed_logins_cannot_lock_the_owner_out_and_forwarded_for_needs_a_trusted_proxy(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    st.add_annotator("alice", "alice-password")
    app = create_app(st, Settings(login_max_failures=3))
    assert [_login_from(app, "203.0.113.9", "alice", f"guess-{i}") for i in range(3)] == [401] * 3
    assert _login_from(app, "203.0.113.9", "alice", "alice-password") == 429    # the guesser is stopped
    assert _login_from(app, "198.51.100.7", "alice", "alice-password") == 303   # alice, elsewhere, is not
    # A spoofed X-Forwarded-For from an untrusted peer changes nothing: still the guesser's address.
    spoof = {"x-forwarded-for": "192.0.2.1"}
    assert _login_from(app, "203.0.113.9", "alice", "guess", spoof) == 429
    # Behind a trusted proxy, the proxy's X-Forwarded-For entry names the client.
    app2 = create_app(st, Settings(login_max_failures=2, trusted_proxies=["127.0.0.1"]))
    for i in range(2):
        assert _login_from(app2, "127.0.0.1", "alice", "x", {"x-forwarded-for": "192.0.2.50"}) == 401
    assert _login_from(app2, "127.0.0.1", "alice", "alice-password", {"x-forwarded-for": "192.0.2.50"}) == 429
    # The client cannot pick its entry: the left-most is whatever it wrote, the right-most the proxy's.
    assert _login_from(app2, "127.0.0.1", "alice", "alice-password",
                       {"x-forwarded-for": "10.9.9.9, 192.0.2.50"}) == 429
    assert _login_from(app2, "127.0.0.1", "alice", "alice-password", {"x-forwarded-for": "192.0.2.51"}) == 303
    st.close()


def test_client_address_rules():
    from rlhfkit.utils.http import client_address, parse_trusted

    scope = lambda peer, xff=None: {"client": (peer, 1), "headers": [(b"x-forwarded-for", xff.encode())] if xff else []}
    proxies = parse_trusted(["127.0.0.1", "10.0.0.0/8"])
    assert client_address(scope("127.0.0.1", "1.2.3.4"), []) == "127.0.0.1"          # nobody trusted
    assert client_address(scope("127.0.0.1", "1.2.3.4"), proxies) == "1.2.3.4"
    assert client_address(scope("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.1.2.3"), proxies) == "1.2.3.4"
    assert client_address(scope("8.8.8.8", "1.2.3.4"), proxies) == "8.8.8.8"        # peer is no proxy
    with pytest.raises(ValueError, match="not an IP"):
        parse_trusted(["localhost"])


def test_logout_ends_the_session_on_the_server_and_everywhere(env):
    _, c, _ = env
    csrf = login(c, "alice", "alice-password")
    cookie = c.cookies.get("rk_session")
    f = task_form(c)
    r = c.post("/logout", data={"csrf": f["csrf"]}, follow_redirects=False)
    assert r.status_code == 303
    stolen = TestClient(c.app, cookies={"rk_session": cookie})          # a copy of the cookie from before
    assert stolen.get("/task", follow_redirects=False).headers["location"] == "/login"
    # Log out everywhere: two browsers, one button.
    a, b = TestClient(c.app), TestClient(c.app)
    login(a, "alice", "alice-password"), login(b, "alice", "alice-password")
    assert b.get("/task", follow_redirects=False).status_code == 200
    r = a.post("/logout", data={"csrf": task_form(a)["csrf"], "everywhere": "1"}, follow_redirects=False)
    assert r.status_code == 303
    assert b.get("/task", follow_redirects=False).headers["location"] == "/login"
    assert csrf  # (the login page's token is not a session's)


def test_sample_text_is_shown_with_bidi_isolation(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    st.import_samples([{"prompt": "Rate", "completion": "Pay \u202egnp.exe\u202c now"}])
    st.add_annotator("alice", "alice-password")
    c = TestClient(create_app(st))
    login(c, "alice", "alice-password")
    html = c.get("/task").text
    assert "\u202e" not in html and "Pay [U+202E]gnp.exe[U+202C] now" in html
    assert re.search(r'<div class="text" dir="auto">Pay', html)
    st.close()


def test_progress_total_does_not_shrink_when_skipping(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    st.import_samples([{"prompt": "p", "completion": f"answer {i}"} for i in range(5)])
    st.add_annotator("alice", "alice-password")
    token = st.new_token("alice")
    c = TestClient(create_app(st))
    h = {"Authorization": f"Bearer {token}"}
    totals = []
    for _ in range(3):
        task = c.get("/api/v1/tasks/next", headers=h).json()["task"]
        totals.append(c.get("/api/v1/progress", headers=h).json()["total"])
        assert c.post(f"/api/v1/tasks/{task['item_id']}/skip", headers=h).status_code == 200
    totals.append(c.get("/api/v1/progress", headers=h).json()["total"])
    assert totals == [5, 5, 5, 5]
    st.close()


def test_openapi_declares_security_errors_and_an_optional_kind(env):
    _, c, tokens = env
    spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    answer = spec["paths"]["/api/v1/tasks/{item_id}/answer"]["post"]
    assert {"200", "201", "401", "403", "404", "409", "413", "422"} <= set(answer["responses"])
    assert answer["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert answer["security"] == [{"HTTPBearer": []}]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for name in ("RatingIn", "RankingIn", "ChoiceIn", "EditIn"):
        assert "kind" in spec["components"]["schemas"][name]["required"]
    h = {"Authorization": f"Bearer {tokens['alice']}"}
    assert c.get("/api/v1/tasks/next?kind=", headers=h).status_code == 200   # empty = any kind
    r = c.get("/api/v1/tasks/next?kind=judge", headers=h)
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
