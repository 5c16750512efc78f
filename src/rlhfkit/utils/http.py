"""What both HTTP servers (the model server and the annotation app) need before a handler sees a request:
a body-size cap that also holds for chunked bodies, a JSON nesting cap, text that is valid Unicode, and
the client's address (from X-Forwarded-For only when the connection comes from a trusted proxy)."""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 64          # deeper than any request we take; json.loads recurses once per level
INT64_MAX = 2 ** 63 - 1      # ids are SQL BIGINTs / 64-bit; anything larger names nothing

# Only brackets matter for nesting; string literals may contain brackets, so they go first.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text (without parsing it; malformed text gives
    some number, and the parser refuses it later)."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(accumulate(1 if c in b"[{" else -1 for c in brackets))


def bad_unicode(text: str) -> bool:
    """True for text that cannot be stored or encoded as UTF-8: a lone surrogate (JSON allows the escape
    \\ud800 without its pair)."""
    return _SURROGATE.search(text) is not None


def find_bad_unicode(value: Any, where: str = "") -> str | None:
    """The location ("messages.0.content") of the first string with a lone surrogate in a parsed JSON
    value (keys included), or None."""
    if isinstance(value, str):
        return where or "body" if bad_unicode(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{where}.{k}" if where else str(k)
            if bad_unicode(str(k)):
                return here
            if (found := find_bad_unicode(v, here)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := find_bad_unicode(v, f"{where}.{i}" if where else str(i))) is not None:
                return found
    return None


def parse_trusted(proxies: list[str] | tuple[str, ...]) -> list[Any]:
    """Addresses or networks ("10.0.0.0/8", "127.0.0.1") of reverse proxies whose X-Forwarded-For we
    believe. Raises ValueError naming a bad entry."""
    nets = []
    for p in proxies:
        try:
            nets.append(ipaddress.ip_network(p.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted proxy {p!r} is not an IP address or network") from None
    return nets


def _in(addr: str, nets: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def client_address(scope: dict, trusted: list[Any]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the right-most entry of
    X-Forwarded-For that is not itself a trusted proxy (entries further left are whatever the client
    wrote, so they prove nothing)."""
    peer = (scope.get("client") or ("", 0))[0] or ""
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = b",".join(v for k, v in scope.get("headers", []) if k == b"x-forwarded-for").decode("latin-1")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


class BodyLimits:
    """ASGI middleware: read the whole request body before the app does, refusing it with 413 once it
    passes `max_bytes` (whether announced by Content-Length or sent chunked), and a JSON body nested deeper
    than `max_depth` with 400. `error(status, message)` makes the (content type, body) of a refusal;
    `headers` are added to every response."""

    def __init__(self, app: Any, max_bytes: int, error: Callable[[int, str], tuple[bytes, bytes]],
                 max_depth: int = MAX_JSON_DEPTH, headers: list[tuple[bytes, bytes]] | None = None,
                 cache_control: Callable[[str], bool] | None = None) -> None:
        self.app, self.max_bytes, self.error, self.max_depth = app, max_bytes, error, max_depth
        self.headers = headers or []
        self.no_store = cache_control

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                extra = list(self.headers)
                if self.no_store is not None and self.no_store(scope["path"]):
                    extra.append((b"cache-control", b"no-store"))
                msg["headers"] = list(msg.get("headers", [])) + extra
            await send(msg)

        limit_kb = f"{self.max_bytes / 1024:g} KiB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send_with_headers, 413, f"request body too large (limit {limit_kb})")
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._refuse(send_with_headers, 413, f"request body too large (limit {limit_kb})")
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        ctype = dict(scope["headers"]).get(b"content-type", b"")
        if body and b"json" in ctype and json_depth(body) > self.max_depth:
            return await self._refuse(send_with_headers, 400,
                                      f"JSON body nested deeper than {self.max_depth} levels")
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: wait for the disconnect

        await self.app(scope, replay, send_with_headers)

    async def _refuse(self, send: Any, status: int, message: str) -> None:
        ctype, body = self.error(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def json_error(key: str = "detail") -> Callable[[int, str], tuple[bytes, bytes]]:
    """error() for BodyLimits: {"detail": message}."""
    return lambda status, message: (b"application/json", json.dumps({key: message}).encode())
