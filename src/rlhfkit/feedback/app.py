"""The annotation web app (`rlhfkit feedback serve`): pages for annotators and admins, and a JSON API.

Pages (a session cookie naming a session kept in the database, so logging out ends it on the server;
every form POST carries the session's CSRF token):
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
from typing import Any, Literal
from urllib.parse import urlparse

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.feedback.store import (
    KINDS,
    TEXT_CEILING,
    Answer,
    FeedbackError,
    Forbidden,
    Invalid,
    Store,
    parse_answer,
    validation_message,
)
from rlhfkit.utils.http import INT64_MAX, BodyLimits, bad_unicode, client_address, json_error, parse_trusted

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
    trusted_proxies: list[str] = []


class LoginThrottle:
    """Failed attempts per key (a name and a client address, or a client address) in a sliding window: once
    a key has `max_failures` within `window_s`, it must wait until the oldest leaves the window. In memory,
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
# Security headers (added to every response by BodyLimits, which also caps bodies)
# --------------------------------------------------------------------------------------------------
HEADERS = [(b"content-security-policy", (b"default-src 'self'; script-src 'self'; style-src 'self'; "
                                        b"img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                        b"frame-ancestors 'none'; form-action 'self'")),
           (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"same-origin")]


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
    task: TaskOut | None


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
    item_id: int | None = Field(description="the task that is pending again; null if nothing to undo")


class CommentIn(BaseModel):
    text: str = Field(min_length=1, max_length=TEXT_CEILING)


class ErrorOut(BaseModel):
    detail: str = Field(description="what was wrong, in words")


class SkippedOut(BaseModel):
    item_id: int
    skipped: bool


class CommentedOut(BaseModel):
    item_id: int


# Statuses every authenticated API route may answer with (besides its own), as the JSON it sends.
_ERR = {"model": ErrorOut}
API_ERRORS: dict[int | str, dict] = {400: {**_ERR, "description": "malformed request (e.g. JSON nested too deep)"},
                                     401: {**_ERR, "description": "missing or invalid bearer token"},
                                     413: {**_ERR, "description": "request body over max_body_kb"},
                                     422: {**_ERR, "description": "invalid input; the message says which"}}
TASK_ERRORS: dict[int | str, dict] = {**API_ERRORS,
                                      403: {**_ERR, "description": "the task is not assigned to you"},
                                      404: {**_ERR, "description": "no such task"},
                                      409: {**_ERR, "description": "conflicts with the task's state"}}
ItemId = PathParam(ge=1, le=INT64_MAX, description="a task's item_id")


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------
def create_app(store: Store, settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()
    secret = store.secret()
    project = cfg.project or None
    # Password guessing gets 429: per annotator name *and* client address (so that nobody can lock an
    # annotator out by failing logins under their name from elsewhere), and per client address with more
    # room (several people may share one address behind a NAT or proxy). The client address is the
    # connection's, or X-Forwarded-For's when the connection comes from a configured trusted proxy.
    by_name = LoginThrottle(cfg.login_max_failures, cfg.login_window_minutes * 60)
    by_addr = LoginThrottle(5 * cfg.login_max_failures, cfg.login_window_minutes * 60)
    trusted = parse_trusted(cfg.trusted_proxies)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals.update(user=None, csrf="", progress=None, msg="", error="")   # page defaults
    env.filters["showbidi"] = show_bidi_controls
    app = FastAPI(title="rlhfkit feedback", version="1",
                  description="Annotation API: get the next task, answer it (rate, rank, pair, edit), "
                              "skip, undo. Authenticate with `Authorization: Bearer <token>`.",
                  docs_url=None, redoc_url=None,  # the Swagger page loads from a CDN: not here
                  responses={413: API_ERRORS[413]})
    app.state.store = store
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # Pages and API answers are per user: never cached; static files may be.
    app.add_middleware(BodyLimits, max_bytes=cfg.max_body_kb * 1024, error=json_error(), headers=HEADERS,
                       cache_control=lambda path: not path.startswith("/static/"))

    def page(name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=code)

    def error(code: int, message: str, who: dict | None = None) -> HTMLResponse:
        return page("error.html", code, user=who, csrf=who["csrf"] if who else "", status=code,
                    message=message)

    # ---- sessions ---------------------------------------------------------------------------------
    def session(request: Request) -> dict | None:
        """The logged-in annotator with the session's CSRF token, or None. Sessions live in the database:
        logout, "log out everywhere", a new password or a disabled account end them there."""
        return store.session(request.cookies.get(SESSION_COOKIE))

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
        name, password = str(form.get("name", ""))[:100], str(form.get("password", ""))[:1000]
        if bad_unicode(name) or bad_unicode(password):
            return page("login.html", 422, csrf=login_csrf(pre["n"]), error="Wrong name or password.")
        addr = client_address(request.scope, trusted)
        key = json.dumps([name, addr])
        wait = max(by_name.wait_s(key), by_addr.wait_s(addr))
        if wait > 0:
            resp = page("login.html", 429, csrf=login_csrf(pre["n"]),
                        error=f"Too many failed logins; try again in {math.ceil(wait / 60)} min.")
            resp.headers["Retry-After"] = str(math.ceil(wait))
            return resp
        who = store.login(name, password)
        if who is None:
            by_name.failed(key)
            by_addr.failed(addr)
            return page("login.html", 401, csrf=login_csrf(pre["n"]), error="Wrong name or password.")
        by_name.clear(key)
        resp = RedirectResponse("/task", status_code=303)
        max_age = int(cfg.session_hours * 3600)
        token, _ = store.open_session(who["id"], max_age)
        set_cookie(resp, SESSION_COOKIE, token, max_age)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    @form_post("/logout")
    def logout(request: Request, form: dict) -> Response:
        """End this session on the server (everywhere=1: every session of this annotator)."""
        who = session(request)
        if who:
            try:
                check_form(request, form, who["csrf"])
            except FeedbackError as e:
                return error(e.status, str(e), who)
            if form.get("everywhere"):
                store.end_sessions(who["id"])
            else:
                store.end_session(request.cookies[SESSION_COOKIE])
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
            raise HTTPException(404, f"unknown export kind; choose from {', '.join(EXPORT_KINDS)}")
        if bad_unicode(project_name):
            raise HTTPException(404, "no such project")
        try:
            recs = records(store, project_name)[kind]
        except FeedbackError as e:
            raise HTTPException(e.status, str(e)) from None
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        return Response(body, media_type="application/x-ndjson",
                        headers={"content-disposition": f'attachment; filename="{kind}.jsonl"'})

    # ---- JSON API ---------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="a token from `rlhfkit feedback users token NAME`")

    def api_user(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        token = cred.credentials.strip() if cred is not None else ""
        who = store.by_token(token) if token and not bad_unicode(token) and len(token) < 200 else None
        if who is None:
            raise HTTPException(401, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def api_admin(who: dict = Depends(api_user)) -> dict:
        if not who["admin"]:
            raise HTTPException(403, "admins only")
        return who

    # Every error of the API is {"detail": "<what was wrong>"} (ErrorOut), validation errors included:
    # their message names the field, and never echoes the input (which may not even be JSON: NaN).
    @app.exception_handler(FeedbackError)
    async def feedback_error(request: Request, exc: FeedbackError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if not str(x).endswith("In"))
        msg = validation_message(first)
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        return JSONResponse({"detail": f"{where}: {msg}" if where else msg}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(UnicodeError)
    async def unicode_error(request: Request, exc: UnicodeError) -> JSONResponse:
        # A last guard: text with a lone surrogate that reached the database driver.
        return JSONResponse({"detail": "text is not valid Unicode (a lone UTF-16 surrogate)"}, status_code=422)

    @app.get("/api/v1/me", response_model=MeOut, tags=["annotator"], responses=API_ERRORS)
    def api_me(who: dict = Depends(api_user)) -> dict:
        return {"name": who["name"], "admin": who["admin"], "progress": store.progress(who["id"], project)}

    @app.get("/api/v1/tasks/next", response_model=NextOut, tags=["annotator"], responses=API_ERRORS,
             summary="The next task (a pending one, or a new claim); task is null when none is left")
    def api_next(who: dict = Depends(api_user),
                 kind: Literal["", "rate", "rank", "pair", "edit"] = Query(
                     "", description="only tasks of this kind; empty = any")) -> dict:
        task = store.next_task(who["id"], project=project, kinds=(kind,) if kind else KINDS)
        return {"task": task.to_dict() if task else None}

    @app.post("/api/v1/tasks/{item_id}/answer", response_model=StoredOut, tags=["annotator"],
              status_code=201, summary="Answer a task; resending the same submission_id stores it once",
              responses={200: {"model": StoredOut, "description": "already stored (duplicate)"}, **TASK_ERRORS})
    def api_answer(answer: Answer, item_id: int = ItemId, who: dict = Depends(api_user)) -> Any:
        stored = store.submit(who["id"], item_id, answer)
        out = {"submission_id": stored.submission_id, "item_id": stored.item_id,
               "duplicate": stored.duplicate}
        return JSONResponse(out, status_code=200) if stored.duplicate else out

    @app.post("/api/v1/tasks/{item_id}/skip", response_model=SkippedOut, tags=["annotator"],
              summary="Skip a pending task", responses=TASK_ERRORS)
    def api_skip(item_id: int = ItemId, who: dict = Depends(api_user)) -> dict:
        store.skip(who["id"], item_id)
        return {"item_id": item_id, "skipped": True}

    @app.post("/api/v1/tasks/{item_id}/comments", response_model=CommentedOut, tags=["annotator"],
              status_code=201, summary="Comment on a task you hold", responses=TASK_ERRORS)
    def api_comment(body: CommentIn, item_id: int = ItemId, who: dict = Depends(api_user)) -> dict:
        store.comment(who["id"], item_id, body.text)
        return {"item_id": item_id}

    @app.post("/api/v1/undo", response_model=UndoOut, tags=["annotator"], responses=API_ERRORS,
              summary="Undo your last answer or skip; that task becomes your next one")
    def api_undo(who: dict = Depends(api_user)) -> dict:
        return {"item_id": store.undo(who["id"])}

    @app.get("/api/v1/progress", response_model=ProgressOut, tags=["annotator"], responses=API_ERRORS)
    def api_progress(who: dict = Depends(api_user)) -> dict:
        return store.progress(who["id"], project)

    @app.get("/api/v1/admin/stats", tags=["admin"], summary="Counts per round and annotator, with agreement",
             responses={**API_ERRORS, 403: {**_ERR, "description": "admins only"}})
    def api_stats(who: dict = Depends(api_admin)) -> dict:
        return admin_stats()

    @app.get("/api/v1/admin/export/{project_name}/{kind}", tags=["admin"],
             summary="Export ratings | pairs | rankings | edits as JSON Lines (docs/formats.md)",
             response_class=Response,
             responses={200: {"description": "one JSON record a line",
                              "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                        **API_ERRORS, 403: {**_ERR, "description": "admins only"},
                        404: {**_ERR, "description": "no such project or export kind"}})
    def api_export(project_name: str, kind: str, who: dict = Depends(api_admin)) -> Response:
        return _jsonl_export(project_name, kind)

    return app


# Explicit direction embeddings, overrides and isolates (LRE RLE PDF LRO RLO, LRI RLI FSI PDI): in a sample
# they would silently reorder what the annotator reads ("evil" shown as "live"). Shown as visible marks;
# the text stays as it is in the database and in the edit box.
_BIDI_CONTROLS = {c: f"[U+{c:04X}]" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def show_bidi_controls(text: str) -> str:
    return str(text).translate(_BIDI_CONTROLS)


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
