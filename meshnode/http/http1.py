"""HTTP/1.1 as the front speaks it: the request heads it reads, the response heads it writes.

`parse` reads only what the front needs (route, Content-Length, Connection, Authorization,
X-Request-Id, the hop header) and returns None for anything aiohttp's strict parser might read
differently; the front then hands the connection over (front.py).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from meshnode.engines import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
)

__all__ = ["Request", "head", "parse"]

# path -> (request schema, ability, canonical path sent upstream)
_ROUTES: dict[bytes, tuple[type, str, str]] = {
    b"/v1/chat/completions": (ChatCompletionRequest, "chat", "/v1/chat/completions"),
    b"/v1/completions": (CompletionRequest, "completion", "/v1/completions"),
    b"/v1/embeddings": (EmbeddingRequest, "embed", "/v1/embeddings"),
    b"/v1/rerank": (RerankRequest, "rerank", "/v1/rerank"),
    b"/v2/rerank": (RerankRequest, "rerank", "/v1/rerank"),
    b"/rerank": (RerankRequest, "rerank", "/v1/rerank"),
}
_HANDED_OVER = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def head(status: int, headers: dict[str, str], framing: bytes, close: bool) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    parts += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
    parts.append(b"Date: %s\r\n%s%s\r\n" % (_date(), framing,
                                           b"Connection: close\r\n" if close else b""))
    return b"".join(parts)


class Request:
    """What the front read of one request's head."""

    __slots__ = ("authorization", "close", "hop", "length", "request_id", "route")

    def __init__(self, route: tuple[type, str, str]) -> None:
        self.route = route
        self.length = -1
        self.close = False
        self.hop: str | None = None
        self.authorization: str | None = None
        self.request_id = ""


def parse(head: bytes) -> Request | None:
    """The request head (up to, without, the blank line), or None to hand it over: anything
    that is not a plain POST to an inference route with exactly one Content-Length, or that
    aiohttp's strict parser might read differently (bare LF, folded lines, a space before a
    colon, Transfer-Encoding, Expect, Upgrade)."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    route = _ROUTES.get(target)
    if method != b"POST" or version != b"HTTP/1.1" or route is None or b"\n" in head.replace(
            b"\r\n", b""):
        return None
    req = Request(route)
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return None  # malformed, or obsolete line folding: aiohttp answers 400
        name = name.lower()
        if name in _HANDED_OVER:
            return None
        value = value.strip()
        if name == b"content-length":
            if req.length >= 0 or not value.isdigit():
                return None
            req.length = int(value)
        elif name == b"connection":
            req.close = b"close" in value.lower()
        elif name == b"authorization":
            req.authorization = value.decode("latin-1")
        elif name == b"x-request-id":
            req.request_id = value.decode("latin-1")
        elif name == b"x-meshnode-hop":
            req.hop = value.decode("latin-1") or None
    return req if req.length >= 0 else None
