"""HTTP/1.1 as the front speaks it: the request heads it reads, the response heads it writes.

`parse` reads only what the front needs (route, Content-Length, Connection, Authorization,
X-Request-Id, the hop header) and returns None for anything aiohttp's strict parser might read
differently; the front then hands the connection over (front.py).
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

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


class Request(NamedTuple):
    """What the front read of one request's head (a tuple: built in one step)."""

    route: tuple[type, str, str]
    """(request schema, ability, canonical path sent upstream)"""
    length: int
    """Content-Length"""
    close: bool = False
    """Connection: close"""
    hop: str | None = None
    """The hop header's value, None when absent or empty."""
    authorization: str | None = None
    request_id: str = ""


# Header lines as RFC 9110 writes them: a token, a colon, a value without CR or LF. Anything
# else (bare LF or CR, obsolete line folding, a space before the colon) fails the match.
_FIELDS = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*)*")
_READ = re.compile(rb"\r\n(host|content-length|connection|authorization|x-request-id"
                   rb"|x-meshnode-hop|transfer-encoding|expect|upgrade):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n|\Z)",
                   re.IGNORECASE)
_HANDED_OVER = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_SUFFIX = b" HTTP/1.1"


def parse(head: bytes) -> Request | None:
    """The request head (up to, without, the blank line), or None to hand it over: anything
    that is not a plain POST to an inference route with one Host and one Content-Length, or
    that aiohttp's strict parser might read differently (bare LF or CR, folded lines, a space
    before a colon, a header read here twice, Transfer-Encoding, Expect, Upgrade).

    Regular expressions do the scanning (in C): this runs on every request the front
    answers, and each line of Python costs ~1 us on a busy 2-core machine (bench/routing)."""
    end = head.find(b"\r\n")
    if end < 0:
        end = len(head)
    line = head[:end]
    route = _ROUTES.get(line[5:-9])
    if route is None or line[:5] != b"POST " or line[-9:] != _SUFFIX:
        return None
    fields = head[end:]
    if _FIELDS.fullmatch(fields) is None:
        return None
    found = _READ.findall(fields)
    read = {name.lower(): value for name, value in found}
    length = read.get(b"content-length")
    if length is None or not length.isdigit() or len(read) != len(found) \
            or b"host" not in read or not _HANDED_OVER.isdisjoint(read):
        return None  # none, a header twice, no Host (aiohttp's 400): aiohttp decides
    if len(read) == 2:
        return Request(route, int(length))
    hop, auth, rid = read.get(b"x-meshnode-hop"), read.get(b"authorization"), \
        read.get(b"x-request-id")
    return Request(route, int(length), b"close" in read.get(b"connection", b"").lower(),
                   hop.decode("latin-1") or None if hop is not None else None,
                   auth.decode("latin-1") if auth is not None else None,
                   rid.decode("latin-1") if rid is not None else "")
