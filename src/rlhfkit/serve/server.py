"""`rlhfkit serve`: any checkpoint behind an OpenAI-compatible HTTP API, and a chat page for feedback.

    GET  /v1/models
    POST /v1/completions        {"prompt": str | [str], "max_tokens", "temperature", "top_p", "n", "stop", "stream"}
    POST /v1/chat/completions   {"messages": [{"role", "content"}], same sampling fields, "stream"}
    GET  /                      chat page: streams answers; thumbs up/down and edits go to the feedback store
    POST /feedback/rate, /feedback/edit   (the chat page's calls; same-origin, CSRF header)

Streaming uses server-sent events like OpenAI's API: `data: {chunk}` lines, then `data: [DONE]`, so the
official `openai` client works against it. Requests are served one at a time (a lock around the model):
a CPU box has no spare cores to run two generations in parallel, and the decoder keeps per-call state.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError

from rlhfkit.config import ServeConfig

HERE = Path(__file__).parent


class CompletionRequest(BaseModel):
    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=5.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    seed: Optional[int] = None


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class ChatRequest(BaseModel):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=5.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    seed: Optional[int] = None


class RateIn(BaseModel):
    messages: list[Message] = Field(min_length=1)  # the conversation up to the rated answer
    completion: str
    rating: int = Field(ge=0, le=1)                  # thumbs down = 0, up = 1


class EditIn(BaseModel):
    messages: list[Message] = Field(min_length=1)
    completion: str
    edited: str = Field(min_length=1)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, so clients show the message."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


class Engine:
    """The model, its tokenizer, and one lock: what every endpoint generates with."""

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
        self.lock = threading.Lock()
        self.torch = torch

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

    def count(self, text: str, templated: bool) -> int:
        return len(self.tok(text, add_special_tokens=not templated)["input_ids"])

    def complete(self, prompts: list[str], n: int, templated: bool, seed: int | None,
                 params: dict) -> list[list[tuple[str, str]]]:
        """n (text, finish_reason) per prompt; finish_reason is "stop" (EOS or a stop string) or "length"."""
        from rlhfkit.rl.rollout import SamplingParams, generate

        ids = [self.tok(p, add_special_tokens=not templated)["input_ids"] for p in prompts]
        with self.lock:
            if seed is not None:
                self.torch.manual_seed(seed)
            ro = generate(self.model, self.tok, ids, SamplingParams(**params), n, prompts=prompts)
        return [[(ro.completions[i * n + j], "stop" if bool(ro.finished[i * n + j]) else "length")
                 for j in range(n)] for i in range(len(prompts))]

    def stream(self, prompt: str, templated: bool, seed: int | None, params: dict) -> Iterator[str]:
        from rlhfkit.rl.rollout import stream

        with self.lock:
            if seed is not None:
                self.torch.manual_seed(seed)
            yield from stream(self.model, self.tok, prompt, add_special_tokens=not templated, **params)


def create_app(cfg: ServeConfig, engine: Engine | None = None, store: Any = None) -> FastAPI:
    engine = engine or Engine(cfg)
    if store is None and cfg.feedback_db:
        from rlhfkit.feedback.store import Store

        Path(cfg.feedback_db).parent.mkdir(parents=True, exist_ok=True) if "://" not in cfg.feedback_db else None
        store = Store(cfg.feedback_db)
    csrf = secrets.token_urlsafe(24)  # per server process; the chat page sends it back in a header
    app = FastAPI(title="rlhfkit serve", version="1", description=__doc__)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def check_len(text: str, what: str) -> JSONResponse | None:
        if len(text) > cfg.max_prompt_chars:
            return _error(400, f"{what} is {len(text)} characters; the limit is {cfg.max_prompt_chars}", what)
        return None

    def check_params(p: dict) -> JSONResponse | None:
        if p["max_new_tokens"] > cfg.max_tokens_limit:
            return _error(400, f"max_tokens={p['max_new_tokens']} exceeds the server's limit of "
                               f"{cfg.max_tokens_limit}", "max_tokens")
        return None

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            return _error(400, f"{where}: {first['msg']}", where or None)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "rlhfkit"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = await parse(request, CompletionRequest)
        if isinstance(r, JSONResponse):
            return r
        prompts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt)
        if not prompts:
            return _error(400, "prompt is empty", "prompt")
        for p in prompts:
            if (bad := check_len(p, "prompt")) is not None:
                return bad
        params = engine.params(r)
        if (bad := check_params(params)) is not None:
            return bad
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if r.stream:
            if len(prompts) != 1 or r.n != 1:
                return _error(400, "stream=true takes one prompt and n=1", "stream")

            def events() -> Iterator[str]:
                for delta in engine.stream(prompts[0], False, r.seed, params):
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                                "choices": [{"text": delta, "index": 0, "logprobs": None, "finish_reason": None}]})
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                            "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        from starlette.concurrency import run_in_threadpool

        outs = await run_in_threadpool(engine.complete, prompts, r.n, False, r.seed, params)
        choices, n_out = [], 0
        for i, per_prompt in enumerate(outs):
            for j, (text, reason) in enumerate(per_prompt):
                choices.append({"text": text, "index": i * r.n + j, "logprobs": None, "finish_reason": reason})
                n_out += engine.count(text, True)
        n_in = sum(engine.count(p, False) for p in prompts)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": choices, "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                              "total_tokens": n_in + n_out}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        r = await parse(request, ChatRequest)
        if isinstance(r, JSONResponse):
            return r
        if (bad := check_len("".join(m.content for m in r.messages), "messages")) is not None:
            return bad
        prompt, templated = engine.chat_prompt(r.messages)
        params = engine.params(r)
        if (bad := check_params(params)) is not None:
            return bad
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if r.stream:
            if r.n != 1:
                return _error(400, "stream=true takes n=1", "n")

            def events() -> Iterator[str]:
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name}
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
                for delta in engine.stream(prompt, templated, r.seed, params):
                    yield _sse({**base, "choices": [{"index": 0, "delta": {"content": delta},
                                                     "finish_reason": None}]})
                yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        from starlette.concurrency import run_in_threadpool

        (outs,) = await run_in_threadpool(engine.complete, [prompt], r.n, templated, r.seed, params)
        n_in = engine.count(prompt, templated)
        n_out = sum(engine.count(t, True) for t, _ in outs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": j, "message": {"role": "assistant", "content": t}, "finish_reason": reason}
                            for j, (t, reason) in enumerate(outs)],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    # ---------------------------------------------------------------------------------------------
    # Chat page and its feedback calls
    # ---------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        html = (HERE / "templates" / "chat.html").read_text(encoding="utf-8")
        html = html.replace("{{MODEL}}", _escape(engine.name)).replace("{{CSRF}}", csrf)
        html = html.replace("{{FEEDBACK}}", "on" if store is not None else "off")
        resp = HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})
        if not request.cookies.get("rk_chat_user"):
            resp.set_cookie("rk_chat_user", f"user-{secrets.token_hex(6)}", httponly=True, samesite="strict")
        return resp

    def feedback_guard(request: Request) -> JSONResponse | None:
        if store is None:
            return _error(404, "this server has no feedback store (start it with --feedback_db)")
        if not secrets.compare_digest(request.headers.get("x-csrf-token", ""), csrf):
            return _error(403, "missing or wrong CSRF token (reload the chat page)")
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return _error(403, "cross-origin feedback is refused")
        return None

    @app.post("/feedback/rate")
    async def rate(request: Request):
        if (bad := feedback_guard(request)) is not None:
            return bad
        r = await parse(request, RateIn)
        if isinstance(r, JSONResponse):
            return r
        from rlhfkit.feedback.store import FeedbackError

        user = request.cookies.get("rk_chat_user", "anonymous")
        prompt = engine.chat_prompt(r.messages)[0]  # what the model saw, rendered here, not by the page
        try:
            stored = store.record_rating(prompt, r.completion, r.rating, user=user, project=cfg.project,
                                         scale=(0, 1), model=engine.name)
        except FeedbackError as e:
            return _error(400, str(e))
        return {"stored": True, "id": getattr(stored, "submission_id", None)}

    @app.post("/feedback/edit")
    async def edit(request: Request):
        if (bad := feedback_guard(request)) is not None:
            return bad
        r = await parse(request, EditIn)
        if isinstance(r, JSONResponse):
            return r
        from rlhfkit.feedback.store import FeedbackError

        user = request.cookies.get("rk_chat_user", "anonymous")
        prompt = engine.chat_prompt(r.messages)[0]
        try:
            stored = store.record_edit(prompt, r.completion, r.edited, user=user, project=cfg.project,
                                       scale=(0, 1), model=engine.name)
        except FeedbackError as e:
            return _error(400, str(e))
        return {"stored": True, "id": getattr(stored, "submission_id", None)}

    app.state.engine, app.state.store = engine, store
    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


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
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level))
    server.run(sockets=[sock])
