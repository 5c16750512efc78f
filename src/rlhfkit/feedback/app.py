"""The annotation web app (`rlhfkit feedback serve`): pages for annotators and admins, and a JSON API.

Pages (session cookie, signed; every form POST carries the session's CSRF token):
    /login  /task (rate | rank by drag | A vs B | edit; skip, undo, keyboard shortcuts)  /admin
JSON API under /api/v1 (Authorization: Bearer <token from `rlhfkit feedback users token`), the same
operations; its OpenAPI spec is at /openapi.json.

All writes go through rlhfkit.feedback.store (pydantic-validated, one transaction each, idempotent on
the client's submission id). Every page is rendered by Jinja with autoescape on; the Content-Security-
Policy allows no inline script, so even a text that slipped through could not run.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from rlhfkit.feedback.store import (KINDS, TEXT_CEILING, Answer, FeedbackError, Forbidden, Invalid, Store,
                                    parse_answer)

HERE = Path(__file__).parent
SESSION_COOKIE, LOGIN_COOKIE = "rk_session", "rk_login"
MESSAGES = {"saved": "Saved.", "skipped": "Skipped.", "undone": "Undone: here is that task again.",
            "nothing": "Nothing to undo."}


class Settings(BaseModel):
    session_hours: float = 12.0
    secure_cookies: bool = False
    max_body_kb: int = 256
    project: str = ""
    login_max_failures: int = 10
    login_window_minutes: float = 15.0


class LoginThrottle:
    """Failed attempts per key (an annotator name, or a client address) in a sliding window: once a key
    has `max_failures` within `window_s`, it must wait until the oldest leaves the window. In memory,
    per server process."""

    def __init__(self, max_failures: int, window_s: float, clock: Any = time.monotonic) -> None:
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self.failures.pop(key, []) if now - t < self.window_s]
        if times:
            self.failures[key] = times
        return times

    def wait_s(self, key: str) -> float:
        """Seconds until the key may try again; 0 = now."""
        with self.lock:
            now = self.clock()
            times = self._recent(key, now)
            return self.window_s - (now - times[0]) if len(times) >= self.max_failures else 0.0

    def failed(self, key: str) -> None:
        with self.lock:
            now = self.clock()
            if len(self.failures) >= 10_000:     # many names tried once: forget those out of the window
                for k in list(self.failures):
                    self._recent(k, now)
            self.failures[key] = self._recent(key, now) + [now]

    def clear(self, key: str) -> None:
        with self.lock:
            self.failures.pop(key, None)


# --------------------------------------------------------------------------------------------------
# Signed session cookies (HMAC-SHA256 over a small JSON payload)
# --------------------------------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sign(secret: bytes, payload: dict) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return body + "." + _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())


def unsign(secret: bytes, value: str | None) -> dict | None:
    """The payload of a cookie we signed, or None if it is missing, forged, or expired."""
    if not value or "." not in value:
        return None
    body, sig = value.rsplit(".", 1)
    want = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig, want):
        return None
    try:
        data = json.loads(_unb64(body))
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("exp", 0) > time.time() else None


# --------------------------------------------------------------------------------------------------
# Middleware: body size cap and security headers
# --------------------------------------------------------------------------------------------------
class LimitsAndHeaders:
    """Refuse bodies over `max_bytes` with 413 (before they reach a handler); add security headers."""

    HEADERS = [(b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; "
                b"img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                b"form-action 'self'"),
               (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
               (b"referrer-policy", b"same-origin")]

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return msg

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                # Pages and API answers are per user: never cached; static files may be.
                cache = [] if scope["path"].startswith("/static/") else [(b"cache-control", b"no-store")]
                msg["headers"] = list(msg.get("headers", [])) + self.HEADERS + cache
            await send(msg)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body too large (limit {self.max_bytes // 1024} KB)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")] + self.HEADERS})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# API models (responses; requests are the store's pydantic models)
# --------------------------------------------------------------------------------------------------
class SampleOut(BaseModel):
    id: int
    text: str


class TaskOut(BaseModel):
    item_id: int
    kind: str = Field(description=" | ".join(KINDS))
    project: str
    round: int
    prompt: str
    samples: list[SampleOut]
    scale: list[int] = Field(description="[min, max] of the Likert scale (rate tasks)")
    submission_id: str = Field(description="a fresh id to send with the answer")


class NextOut(BaseModel):
    task: Optional[TaskOut]


class StoredOut(BaseModel):
    submission_id: str
    item_id: int
    duplicate: bool = Field(description="true: this submission id was stored before, nothing new written")


class ProgressOut(BaseModel):
    done: int
    skipped: int
    pending: int
    available: int
    total: int


class MeOut(BaseModel):
    name: str
    admin: bool
    progress: ProgressOut


class UndoOut(BaseModel):
    item_id: Optional[int] = Field(description="the task that is pending again; null if nothing to undo")


class CommentIn(BaseModel):
    text: str = Field(min_length=1, max_length=TEXT_CEILING)


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------
def create_app(store: Store, settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()
    secret = store.secret()
    project = cfg.project or None
    # Password guessing gets 429: per annotator name, and per client address with more room (several
    # people may share one address behind a NAT or proxy).
    by_name = LoginThrottle(cfg.login_max_failures, cfg.login_window_minutes * 60)
    by_addr = LoginThrottle(5 * cfg.login_max_failures, cfg.login_window_minutes * 60)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals.update(user=None, csrf="", progress=None, msg="", error="")   # page defaults
    app = FastAPI(title="rlhfkit feedback", version="1",
                  description="Annotation API: get the next task, answer it (rate, rank, pair, edit), "
                              "skip, undo. Authenticate with `Authorization: Bearer <token>`.",
                  docs_url=None, redoc_url=None)  # the Swagger page loads from a CDN: not here
    app.state.store = store
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(LimitsAndHeaders, max_bytes=cfg.max_body_kb * 1024)

    def page(name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=code)

    def error(code: int, message: str, who: dict | None = None) -> HTMLResponse:
        return page("error.html", code, user=who, csrf=who["csrf"] if who else "", status=code,
                    message=message)

    # ---- sessions ---------------------------------------------------------------------------------
    def session(request: Request) -> dict | None:
        data = unsign(secret, request.cookies.get(SESSION_COOKIE))
        if data is None:
            return None
        who = store.by_id(int(data.get("a", 0)))
        if who is None or data.get("p") != who["pw"]:   # disabled, or the password changed since login
            return None
        return {**who, "csrf": data["c"]}

    def set_cookie(resp: Response, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax",
                        secure=cfg.secure_cookies, path="/")

    def check_form(request: Request, form: dict, csrf: str) -> None:
        """Refuse a POSTed form without the right CSRF token, or posted from another site."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlparse(origin).netloc != request.headers.get("host"):
            raise Forbidden("cross-site form post refused")
        if not hmac.compare_digest(str(form.get("csrf", "")), csrf):
            raise Forbidden("the form's security token is missing or wrong; reload the page and try again")

    def form_post(path: str) -> Any:
        """Register a form handler fn(request, form, **path params). Only reading the body runs on the
        event loop; the handler (password hashing, database) runs in the thread pool."""
        def register(fn: Any) -> Any:
            async def endpoint(request: Request) -> Response:
                form = dict(await request.form())
                return await run_in_threadpool(fn, request, form, **request.path_params)

            app.add_api_route(path, endpoint, methods=["POST"], include_in_schema=False)
            return fn
        return register

    def login_csrf(nonce: str) -> str:
        return hmac.new(secret, f"login:{nonce}".encode(), hashlib.sha256).hexdigest()[:32]

    # ---- HTML pages -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        return RedirectResponse("/task" if session(request) else "/login", status_code=303)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/login", include_in_schema=False)
    def login_page() -> Response:
        nonce = secrets.token_urlsafe(16)
        resp = page("login.html", csrf=login_csrf(nonce))
        set_cookie(resp, LOGIN_COOKIE, sign(secret, {"n": nonce, "exp": time.time() + 3600}), 3600)
        return resp

    @form_post("/login")
    def login(request: Request, form: dict) -> Response:
        pre = unsign(secret, request.cookies.get(LOGIN_COOKIE))
        if pre is None:
            return error(403, "Your login form expired or cookies are off; reload the login page.")
        try:
            check_form(request, form, login_csrf(pre["n"]))
        except FeedbackError as e:
            return error(e.status, str(e))
        name, addr = str(form.get("name", ""))[:100], request.client.host if request.client else ""
        wait = max(by_name.wait_s(name), by_addr.wait_s(addr))
        if wait > 0:
            resp = page("login.html", 429, csrf=login_csrf(pre["n"]),
                        error=f"Too many failed logins; try again in {math.ceil(wait / 60)} min.")
            resp.headers["Retry-After"] = str(math.ceil(wait))
            return resp
        who = store.login(name, str(form.get("password", ""))[:1000])
        if who is None:
            by_name.failed(name)
            by_addr.failed(addr)
            return page("login.html", 401, csrf=login_csrf(pre["n"]), error="Wrong name or password.")
        by_name.clear(name)
        resp = RedirectResponse("/task", status_code=303)
        max_age = int(cfg.session_hours * 3600)
        payload = {"a": who["id"], "p": who["pw"], "c": secrets.token_urlsafe(24),
                   "exp": time.time() + max_age}
        set_cookie(resp, SESSION_COOKIE, sign(secret, payload), max_age)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    @form_post("/logout")
    def logout(request: Request, form: dict) -> Response:
        who = session(request)
        if who:
            try:
                check_form(request, form, who["csrf"])
            except FeedbackError as e:
                return error(e.status, str(e), who)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    def task_page(who: dict, task: Any, status: int = 200, error: str = "", msg: str = "",
                  form: dict | None = None) -> HTMLResponse:
        return page("task.html", status, user=who, csrf=who["csrf"], task=task, error=error, msg=msg,
                    progress=store.progress(who["id"], project), form=form or {},
                    max_chars=store.max_text_chars)

    @app.get("/task", include_in_schema=False)
    def next_page(request: Request, m: str = "") -> Response:
        who = session(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        task = store.next_task(who["id"], project=project)
        if task is None:
            return page("done.html", user=who, csrf=who["csrf"], msg=MESSAGES.get(m, ""),
                        progress=store.progress(who["id"], project))
        return task_page(who, task, msg=MESSAGES.get(m, ""))

    @form_post("/task/{item_id:int}")
    def answer_page(request: Request, form: dict, item_id: int) -> Response:
        who = session(request)
        if who is None:
            return error(401, "Please log in again.")
        try:
            check_form(request, form, who["csrf"])
            if form.get("action") == "skip":
                store.skip(who["id"], item_id)
                return RedirectResponse("/task?m=skipped", status_code=303)
            store.submit(who["id"], item_id, _answer_from_form(form))
            return RedirectResponse("/task?m=saved", status_code=303)
        except FeedbackError as e:
            if isinstance(e, Invalid):
                # Show the same task again with the problem, keeping what was typed.
                try:
                    return task_page(who, store.task(who["id"], item_id), e.status, str(e), form=form)
                except FeedbackError:
                    pass
            return error(e.status, str(e), who)

    @form_post("/undo")
    def undo_page(request: Request, form: dict) -> Response:
        who = session(request)
        if who is None:
            return error(401, "Please log in again.")
        try:
            check_form(request, form, who["csrf"])
        except FeedbackError as e:
            return error(e.status, str(e), who)
        item = store.undo(who["id"])
        return RedirectResponse(f"/task?m={'undone' if item else 'nothing'}", status_code=303)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> Response:
        who = session(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        if not who["admin"]:
            return error(403, "The admin view is for admins.", who)
        return page("admin.html", user=who, csrf=who["csrf"], stats=admin_stats(), progress=None)

    @app.get("/admin/export/{project_name}/{kind}.jsonl", include_in_schema=False)
    def admin_export(request: Request, project_name: str, kind: str) -> Response:
        who = session(request)
        if who is None or not who["admin"]:
            return error(403, "Exports are for admins.", who)
        return _jsonl_export(project_name, kind)

    def admin_stats() -> dict:
        from rlhfkit.feedback.agreement import store_agreement

        st = store.stats(project)
        for r in st["rounds"]:
            r["agreement"] = store_agreement(store, r["project"], r["round"])
        return st

    def _jsonl_export(project_name: str, kind: str) -> Response:
        from rlhfkit.feedback.export import EXPORT_KINDS, records

        if kind not in EXPORT_KINDS:
            raise HTTPException(404, f"unknown export kind {kind!r}; choose from {', '.join(EXPORT_KINDS)}")
        try:
            recs = records(store, project_name)[kind]
        except FeedbackError as e:
            raise HTTPException(e.status, str(e)) from None
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        return Response(body, media_type="application/x-ndjson",
                        headers={"content-disposition": f'attachment; filename="{kind}.jsonl"'})

    # ---- JSON API ---------------------------------------------------------------------------------
    def api_user(request: Request) -> dict:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        who = store.by_token(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if who is None:
            raise HTTPException(401, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def api_admin(who: dict = Depends(api_user)) -> dict:
        if not who["admin"]:
            raise HTTPException(403, "admins only")
        return who

    @app.exception_handler(FeedbackError)
    async def feedback_error(request: Request, exc: FeedbackError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/api/v1/me", response_model=MeOut, tags=["annotator"])
    def api_me(who: dict = Depends(api_user)) -> dict:
        return {"name": who["name"], "admin": who["admin"], "progress": store.progress(who["id"], project)}

    @app.get("/api/v1/tasks/next", response_model=NextOut, tags=["annotator"],
             summary="The next task (a pending one, or a new claim); task is null when none is left")
    def api_next(who: dict = Depends(api_user), kind: Optional[str] = None) -> dict:
        if kind is not None and kind not in KINDS:
            raise Invalid(f"kind must be one of {', '.join(KINDS)}")
        task = store.next_task(who["id"], project=project, kinds=(kind,) if kind else KINDS)
        return {"task": task.to_dict() if task else None}

    @app.post("/api/v1/tasks/{item_id}/answer", response_model=StoredOut, tags=["annotator"],
              status_code=201, summary="Answer a task; resending the same submission_id stores it once",
              responses={200: {"model": StoredOut, "description": "already stored (duplicate)"}})
    def api_answer(item_id: int, answer: Answer, who: dict = Depends(api_user)) -> Any:
        stored = store.submit(who["id"], item_id, answer)
        out = {"submission_id": stored.submission_id, "item_id": stored.item_id,
               "duplicate": stored.duplicate}
        return JSONResponse(out, status_code=200) if stored.duplicate else out

    @app.post("/api/v1/tasks/{item_id}/skip", tags=["annotator"], summary="Skip a pending task")
    def api_skip(item_id: int, who: dict = Depends(api_user)) -> dict:
        store.skip(who["id"], item_id)
        return {"item_id": item_id, "skipped": True}

    @app.post("/api/v1/tasks/{item_id}/comments", tags=["annotator"], status_code=201,
              summary="Comment on a task you hold")
    def api_comment(item_id: int, body: CommentIn, who: dict = Depends(api_user)) -> dict:
        store.comment(who["id"], item_id, body.text)
        return {"item_id": item_id}

    @app.post("/api/v1/undo", response_model=UndoOut, tags=["annotator"],
              summary="Undo your last answer or skip; that task becomes your next one")
    def api_undo(who: dict = Depends(api_user)) -> dict:
        return {"item_id": store.undo(who["id"])}

    @app.get("/api/v1/progress", response_model=ProgressOut, tags=["annotator"])
    def api_progress(who: dict = Depends(api_user)) -> dict:
        return store.progress(who["id"], project)

    @app.get("/api/v1/admin/stats", tags=["admin"], summary="Counts per round and annotator, with agreement")
    def api_stats(who: dict = Depends(api_admin)) -> dict:
        return admin_stats()

    @app.get("/api/v1/admin/export/{project_name}/{kind}", tags=["admin"],
             summary="Export ratings | pairs | rankings | edits as JSON Lines (docs/formats.md)")
    def api_export(project_name: str, kind: str, who: dict = Depends(api_admin)) -> Response:
        return _jsonl_export(project_name, kind)

    return app


def _answer_from_form(form: dict) -> Any:
    """Form fields -> the same pydantic answer models the JSON API takes."""
    kind = form.get("kind")
    data: dict[str, Any] = {"kind": kind, "submission_id": form.get("submission_id", ""),
                            "comment": form.get("comment", "")}
    try:
        if kind == "rate":
            if not form.get("rating"):
                raise Invalid("pick a rating first")
            data["rating"] = int(form["rating"])
        elif kind == "rank":
            data["order"] = [int(x) for x in str(form.get("order", "")).split(",") if x.strip()]
        elif kind == "pair":
            choice = form.get("choice", "")
            data["tie"] = choice == "tie"
            data["chosen"] = None if choice == "tie" else int(choice)
        elif kind == "edit":
            data["edited"] = form.get("edited", "")
    except ValueError:
        raise Invalid(f"malformed {kind} answer") from None
    return parse_answer(data)
