"""`rlhfkit serve`: any checkpoint behind an OpenAI-compatible HTTP API, and a chat page for feedback.

    GET  /v1/models
    POST /v1/completions        {"prompt": str | [str], "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
    POST /v1/chat/completions   {"messages": [{"role", "content"}], same sampling fields, "stream"}
    GET  /                      chat page: streams answers; thumbs up/down and edits go to the feedback store
    POST /feedback/rate, /feedback/edit   (the chat page's calls: its session cookie and CSRF header)

Streaming uses server-sent events like OpenAI's API: `data: {chunk}` lines, then `data: [DONE]`, so the
official `openai` client works against it.

Bounded work: every request is checked against the server's limits (body bytes, prompts, n, max_tokens,
and its whole cost in tokens: the prompts after the chat template plus n x max_tokens each) before any
generation, and refused with a 400 naming the limit. The model runs one piece of work at a time (a CPU box
has no spare cores for two), through a first-come first-served queue whose pieces are decode steps: a
request (all its prompts x n samples in one batch) queues again before each step, so a large request takes
turns with small ones instead of holding the model to its end. A seeded request draws its randomness from
its own generator, so its answer does not depend on what else ran. A request not done within
request_timeout_s gets a 503.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhfkit.config import ServeConfig
from rlhfkit.utils.http import INT64_MAX, BodyLimits, find_bad_unicode

HERE = Path(__file__).parent
CHAT_COOKIE = "rk_chat"
CHAT_SESSION_S = 7 * 24 * 3600   # a chat page's identity lasts a week (renewed on each visit)


class _Sampling(BaseModel):
    # Strict types (a seed of 1.5 or "3" is an error, not rounded); unknown fields are ignored: OpenAI
    # clients send fields we do not use (user, ...).
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=INT64_MAX)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=INT64_MAX)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class RateIn(BaseModel):
    model_config = ConfigDict(strict=True)
    messages: list[Message] = Field(min_length=1)  # the conversation up to the rated answer
    completion: str
    rating: int = Field(ge=0, le=1)                  # thumbs down = 0, up = 1


class EditIn(BaseModel):
    model_config = ConfigDict(strict=True)
    messages: list[Message] = Field(min_length=1)
    completion: str
    edited: str = Field(min_length=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(BaseModel):
    error: ErrorDetail


class RequestError(Exception):
    """A request the server refuses: its status and a message naming what was wrong."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "server_busy" if status == 503 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, so clients show the message."""
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(_error_body(status, message, param), status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------------
# Scheduling: one piece of work at a time, first come first served, with a deadline
# --------------------------------------------------------------------------------------------------
class TurnQueue:
    """The model is used by one caller at a time, in arrival order. A caller with more work queues again
    after each piece (`turn()` per piece), so callers take turns. Waiting past a deadline raises
    RequestError(503) and gives up the place in the queue."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: deque[object] = deque()
        self.busy = False

    def acquire(self, deadline: float) -> None:
        me = object()
        with self.cond:
            self.waiting.append(me)
            while self.busy or self.waiting[0] is not me:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.waiting.remove(me)
                    self.cond.notify_all()
                    raise RequestError(503, "the request timed out waiting for the model "
                                            "(request_timeout_s); try again later")
                self.cond.wait(left)
            self.waiting.popleft()
            self.busy = True

    def release(self) -> None:
        with self.cond:
            self.busy = False
            self.cond.notify_all()

    @contextmanager
    def turn(self, deadline: float) -> Iterator[None]:
        self.acquire(deadline)
        try:
            yield
        finally:
            self.release()


class _TakingTurns:
    """A decoder (rollout.make_decoder's) that holds the queue while it works and gives it up for a moment
    before every decode step: other requests' steps slot in between, so a long generation cannot make a
    short one wait for its end. Everything between two steps (sampling, stop strings) runs in the turn."""

    def __init__(self, dec: Any, queue: TurnQueue, deadline: float) -> None:
        self.dec, self.queue, self.deadline, self.held = dec, queue, deadline, False

    def _take(self) -> None:
        if self.held:
            self.held = False
            self.queue.release()
        if time.monotonic() > self.deadline:
            raise RequestError(503, "the request timed out (request_timeout_s); ask for fewer tokens")
        self.queue.acquire(self.deadline)
        self.held = True

    def start(self, *args: Any) -> Any:
        self._take()
        return self.dec.start(*args)

    def step(self, tokens: Any) -> Any:
        self._take()
        return self.dec.step(tokens)

    def close(self) -> None:
        if self.held:
            self.held = False
            self.queue.release()


class _Rng:
    """A seeded request's own random state, carried from one of its turns to the next, so that what other
    requests draw in between does not change its samples. Unseeded requests use the global generator."""

    def __init__(self, torch: Any, seed: int | None, device: Any) -> None:
        self.torch, self.seed, self.state = torch, seed, None
        self.cuda = [device] if getattr(device, "type", str(device)).startswith("cuda") else []

    @contextmanager
    def active(self) -> Iterator[None]:
        if self.seed is None:
            yield
            return
        torch = self.torch
        with torch.random.fork_rng(devices=self.cuda):
            if self.state is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.state[0])
                for d, st in zip(self.cuda, self.state[1]):
                    torch.cuda.set_rng_state(st, d)
            yield
            self.state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda])


class Engine:
    """The model, its tokenizer, and the turn queue every endpoint generates through."""

    def __init__(self, cfg: ServeConfig) -> None:
        import torch

        from rlhfkit.config import TokenizerConfig
        from rlhfkit.models.factory import get_tokenizer, load_causal_lm
        from rlhfkit.utils.runtime import quiet_hf, resolve_device

        quiet_hf()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.tok = get_tokenizer(TokenizerConfig(), cfg.model)
        self.model = load_causal_lm(cfg.model).to(self.device).eval()
        self.name = cfg.name or Path(cfg.model.rstrip("/")).name or cfg.model
        self.queue = TurnQueue()
        self.torch = torch
        # Positions the model has embeddings for (None: no fixed limit known).
        self.context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def params(self, r: Any) -> dict[str, Any]:
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        return {"max_new_tokens": r.max_tokens or self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature if r.temperature is None else r.temperature,
                "top_p": self.cfg.top_p if r.top_p is None else r.top_p, "stop": stop}

    def chat_prompt(self, messages: list[Message]) -> tuple[str, bool]:
        """The text the model sees for a conversation, and whether it already holds special tokens."""
        msgs = [m.model_dump() for m in messages]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), True
        # No template (a plain pretrained LM): a readable transcript ending where the answer starts.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
        return "\n".join(lines) + "\nAssistant:", False

    def encode(self, text: str, templated: bool) -> list[int]:
        return self.tok(text, add_special_tokens=not templated)["input_ids"]

    def complete(self, ids: list[list[int]], n: int, seed: int | None, params: dict,
                 deadline: float) -> list[list[tuple[str, str, int]]]:
        """n (text, finish_reason, tokens) per prompt; finish_reason is "stop" (EOS or a stop string) or
        "length". All prompts in one batch, taking turns with other requests at every decode step."""
        from rlhfkit.rl.rollout import SamplingParams, generate, make_decoder

        sp, torch = SamplingParams(**params), self.torch
        # A seeded request draws its sampling randomness from its own generator, up front: its samples do
        # not depend on what other requests drew in between.
        uniforms = None if seed is None else torch.rand(
            len(ids) * n, sp.max_new_tokens, generator=torch.Generator().manual_seed(seed))
        dec = _TakingTurns(make_decoder(self.model), self.queue, deadline)
        try:
            ro = generate(self.model, self.tok, ids, sp, n, uniforms=uniforms, decoder=dec)
        finally:
            dec.close()
        lengths = ro.lengths.tolist()
        return [[(ro.completions[i * n + j], "stop" if bool(ro.finished[i * n + j]) else "length",
                  int(lengths[i * n + j])) for j in range(n)] for i in range(len(ids))]

    def stream(self, ids: list[int], seed: int | None, params: dict, deadline: float) -> Iterator[str]:
        """Text deltas of one completion; one turn of the queue per decode step."""
        from rlhfkit.rl.rollout import stream

        rng = _Rng(self.torch, seed, self.device)
        steps = stream(self.model, self.tok, ids, **params)
        try:
            while True:
                if time.monotonic() > deadline:
                    raise RequestError(503, "the request timed out (request_timeout_s)")
                with self.queue.turn(deadline), rng.active():
                    delta = next(steps, None)
                if delta is None:
                    return
                yield delta
        finally:
            steps.close()


# --------------------------------------------------------------------------------------------------
# Request checks
# --------------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of range for a number")
    return x


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no numbers that overflow to infinity, valid UTF-8, no lone surrogates."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"request body is not valid JSON ({str(e)[:200]})") from None
    where = find_bad_unicode(body)
    if where is not None:
        raise RequestError(400, f"{where}: text is not valid Unicode (a lone UTF-16 surrogate)", where)
    return body


def _validate(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestError(400, f"{where or 'body'}: {first['msg']}", where or None) from None


def create_app(cfg: ServeConfig, engine: Engine | None = None, store: Any = None) -> FastAPI:
    from rlhfkit.feedback.app import sign, unsign

    engine = engine or Engine(cfg)
    if store is None and cfg.feedback_db:
        from rlhfkit.feedback.store import Store

        Path(cfg.feedback_db).parent.mkdir(parents=True, exist_ok=True) if "://" not in cfg.feedback_db else None
        store = Store(cfg.feedback_db)
    # Signs the chat page's session cookies; kept in the feedback store so sessions survive a restart.
    secret = store.secret("chat_session_secret") if store is not None else secrets.token_bytes(32)
    app = FastAPI(title="rlhfkit serve", version="1", description=__doc__, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(BodyLimits, max_bytes=cfg.max_body_kb * 1024,
                       error=lambda st, msg: (b"application/json", json.dumps(_error_body(st, msg)).encode()))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        return _validate(model, _parse_json(await request.body()))

    def check_sampling(r: _Sampling, n_prompts: int, prompt_tokens: list[int]) -> dict:
        """The sampling parameters, once the request is within every limit; else RequestError(400)."""
        if r.n > cfg.max_n:
            raise RequestError(400, f"n={r.n} exceeds the server's limit of {cfg.max_n} (max_n)", "n")
        p = engine.params(r)
        if p["max_new_tokens"] > cfg.max_tokens_limit:
            raise RequestError(400, f"max_tokens={p['max_new_tokens']} exceeds the server's limit of "
                                    f"{cfg.max_tokens_limit} (max_tokens_limit)", "max_tokens")
        if len(p["stop"]) > 4 or any(not s or len(s) > 100 for s in p["stop"]):
            raise RequestError(400, "stop takes up to 4 strings of 1 to 100 characters", "stop")
        cost = sum(prompt_tokens) + n_prompts * r.n * p["max_new_tokens"]
        if cost > cfg.max_request_tokens:
            raise RequestError(400, f"this request may cost {cost} tokens ({sum(prompt_tokens)} of prompt "
                                    f"after templating + {n_prompts} prompt(s) x n={r.n} x "
                                    f"max_tokens={p['max_new_tokens']}); the server's limit is "
                                    f"{cfg.max_request_tokens} (max_request_tokens)", "max_tokens")
        longest = max(prompt_tokens)
        if engine.context and longest + p["max_new_tokens"] > engine.context:
            raise RequestError(400, f"the prompt ({longest} tokens) plus max_tokens={p['max_new_tokens']} "
                                    f"exceeds the model's context of {engine.context} tokens", "max_tokens")
        return p

    def check_chars(text: str, what: str) -> None:
        if len(text) > cfg.max_prompt_chars:
            raise RequestError(400, f"{what} is {len(text)} characters; the limit is {cfg.max_prompt_chars} "
                                    "(max_prompt_chars)", what)

    @app.get("/v1/models", tags=["api"])
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "rlhfkit"}]}

    @app.post("/v1/completions", tags=["api"])
    async def completions(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        deadline = time.monotonic() + cfg.request_timeout_s
        r = await parse(request, CompletionRequest)
        prompts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt)
        if not prompts:
            raise RequestError(400, "prompt is empty", "prompt")
        if len(prompts) > cfg.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts exceed the server's limit of {cfg.max_prompts} "
                                    "per request (max_prompts)", "prompt")
        for p in prompts:
            check_chars(p, "prompt")
        ids = [engine.encode(p, False) for p in prompts]
        if any(not x for x in ids):
            raise RequestError(400, "a prompt is empty (no tokens)", "prompt")
        params = check_sampling(r, len(prompts), [len(x) for x in ids])
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if r.stream:
            if len(prompts) != 1 or r.n != 1:
                raise RequestError(400, "stream=true takes one prompt and n=1", "stream")
            base = {"id": rid, "object": "text_completion", "created": created, "model": engine.name}
            return _streaming(engine.stream(ids[0], r.seed, params, deadline),
                              lambda d: {**base, "choices": [{"text": d, "index": 0, "logprobs": None,
                                                              "finish_reason": None}]},
                              {**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                    "finish_reason": "stop"}]})
        outs = await run_in_threadpool(engine.complete, ids, r.n, r.seed, params, deadline)
        choices = [{"text": text, "index": i * r.n + j, "logprobs": None, "finish_reason": reason}
                   for i, per_prompt in enumerate(outs) for j, (text, reason, _) in enumerate(per_prompt)]
        n_in = sum(len(x) for x in ids)
        n_out = sum(k for per_prompt in outs for _, _, k in per_prompt)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": choices, "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                              "total_tokens": n_in + n_out}}

    @app.post("/v1/chat/completions", tags=["api"])
    async def chat(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        deadline = time.monotonic() + cfg.request_timeout_s
        r = await parse(request, ChatRequest)
        check_chars("".join(m.content for m in r.messages), "messages")
        prompt, templated = engine.chat_prompt(r.messages)
        check_chars(prompt, "messages")   # the template adds text per message, even for empty ones
        ids = engine.encode(prompt, templated)
        params = check_sampling(r, 1, [len(ids)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if r.stream:
            if r.n != 1:
                raise RequestError(400, "stream=true takes n=1", "n")
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
            return _streaming(engine.stream(ids, r.seed, params, deadline),
                              lambda d: {**base, "choices": [{"index": 0, "delta": {"content": d},
                                                              "finish_reason": None}]},
                              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, first)
        (outs,) = await run_in_threadpool(engine.complete, [ids], r.n, r.seed, params, deadline)
        n_in, n_out = len(ids), sum(k for _, _, k in outs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": j, "message": {"role": "assistant", "content": t}, "finish_reason": reason}
                            for j, (t, reason, _) in enumerate(outs)],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    # ---------------------------------------------------------------------------------------------
    # Chat page and its feedback calls
    # ---------------------------------------------------------------------------------------------
    def chat_session(request: Request) -> dict | None:
        data = unsign(secret, request.cookies.get(CHAT_COOKIE))
        return data if data and isinstance(data.get("u"), str) and isinstance(data.get("c"), str) else None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        # Each browser gets its own identity and CSRF token, issued and signed here; nothing the page
        # could set itself names who gave the feedback.
        sess = chat_session(request) or {"u": f"chat-{secrets.token_hex(8)}", "c": secrets.token_urlsafe(24)}
        sess["exp"] = time.time() + CHAT_SESSION_S
        html = (HERE / "templates" / "chat.html").read_text(encoding="utf-8")
        html = html.replace("{{MODEL}}", _escape(engine.name)).replace("{{CSRF}}", sess["c"])
        html = html.replace("{{FEEDBACK}}", "on" if store is not None else "off")
        resp = HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
                                           "Cache-Control": "no-store"})
        resp.set_cookie(CHAT_COOKIE, sign(secret, sess), max_age=CHAT_SESSION_S, httponly=True,
                        samesite="strict")
        return resp

    def feedback_user(request: Request) -> str:
        """The chat session's user name, once the request proves it comes from that session's page."""
        if store is None:
            raise RequestError(404, "this server has no feedback store (start it with --feedback_db)")
        sess = chat_session(request)
        if sess is None:
            raise RequestError(403, "no chat session (open the chat page first)")
        if not secrets.compare_digest(request.headers.get("x-csrf-token", ""), sess["c"]):
            raise RequestError(403, "missing or wrong CSRF token (reload the chat page)")
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            raise RequestError(403, "cross-origin feedback is refused")
        return sess["u"]

    async def store_feedback(request: Request, model: type[BaseModel], kind: str) -> dict:
        from starlette.concurrency import run_in_threadpool

        from rlhfkit.feedback.store import FeedbackError

        user = feedback_user(request)
        r = await parse(request, model)
        prompt = engine.chat_prompt(r.messages)[0]  # what the model saw, rendered here, not by the page
        try:
            if kind == "rate":
                stored = await run_in_threadpool(
                    lambda: store.record_rating(prompt, r.completion, r.rating, user=user, project=cfg.project,
                                                scale=(0, 1), model=engine.name))
            else:
                stored = await run_in_threadpool(
                    lambda: store.record_edit(prompt, r.completion, r.edited, user=user, project=cfg.project,
                                              scale=(0, 1), model=engine.name))
        except FeedbackError as e:
            raise RequestError(e.status, str(e)) from None
        return {"stored": True, "id": getattr(stored, "submission_id", None)}

    @app.post("/feedback/rate", tags=["chat page"])
    async def rate(request: Request) -> dict:
        return await store_feedback(request, RateIn, "rate")

    @app.post("/feedback/edit", tags=["chat page"])
    async def edit(request: Request) -> dict:
        return await store_feedback(request, EditIn, "edit")

    app.openapi = lambda: _openapi(app)   # type: ignore[method-assign]
    app.state.engine, app.state.store = engine, store
    return app


def _streaming(deltas: Iterator[str], chunk: Any, last: dict, first: dict | None = None) -> StreamingResponse:
    """Server-sent events: `first`, a chunk per delta, `last`, [DONE]. A failure after the 200 has gone out
    (a timeout) ends the stream with an error event, never silently."""
    def events() -> Iterator[str]:
        if first is not None:
            yield _sse(first)
        try:
            for delta in deltas:
                yield _sse(chunk(delta))
        except RequestError as e:
            yield _sse(_error_body(e.status, e.message, e.param))
            return
        except Exception as e:   # a bug: the client still learns that the stream failed
            logging.getLogger(__name__).exception("stream failed")
            yield _sse({"error": {"message": f"generation failed ({type(e).__name__})", "type": "server_error",
                                  "param": None, "code": None}})
            return
        yield _sse(last)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _openapi(app: FastAPI) -> dict:
    """The spec as served: request bodies (the handlers read them themselves, to answer in OpenAI's error
    shape), every status a route returns, the chat page's session cookie and CSRF header."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionRequest, ChatRequest, RateIn, EditIn, ErrorOut):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    spec["components"]["securitySchemes"] = {
        "chatSession": {"type": "apiKey", "in": "cookie", "name": CHAT_COOKIE,
                        "description": "issued by GET / (the chat page)"},
        "csrfHeader": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                       "description": "the chat page's csrf-token meta tag"}}
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    desc = {400: "invalid request, or over a limit (the message names it)", 403: "no session or bad CSRF token",
            404: "feedback is off", 409: "conflicts with stored feedback", 413: "request body too large",
            422: "feedback the store refuses", 503: "timed out (request_timeout_s)"}
    ok_any = {"description": "the result", "content": {"application/json": {"schema": {"type": "object"}}}}
    routes = {"/v1/completions": ("CompletionRequest", (400, 413, 503), True),
              "/v1/chat/completions": ("ChatRequest", (400, 413, 503), True),
              "/feedback/rate": ("RateIn", (400, 403, 404, 409, 413, 422), False),
              "/feedback/edit": ("EditIn", (400, 403, 404, 409, 413, 422), False)}
    for path, (body, codes, streams) in routes.items():
        op = spec["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
        ok = json.loads(json.dumps(ok_any))
        if streams:
            ok["content"]["text/event-stream"] = {"schema": {  # one server-sent event
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                               "event": {"type": "string"}}}}
            ok["description"] = "the result (server-sent events with stream=true)"
        op["responses"] = {"200": ok, **{str(c): {"description": desc[c], **err} for c in codes}}
        if path.startswith("/feedback/"):
            op["security"] = [{"chatSession": [], "csrfHeader": []}]
    app.openapi_schema = spec
    return spec


def serve(cfg: ServeConfig) -> None:
    import socket

    import uvicorn

    app = create_app(cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port = sock.getsockname()[1]
    print(f"serving {app.state.engine.name} on http://{cfg.host}:{port}  (chat page: /, API: /v1, "
          f"feedback: {cfg.feedback_db or 'off'})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, proxy_headers=False))
    server.run(sockets=[sock])
