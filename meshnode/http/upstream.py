"""A lean HTTP/1.1 client for the two hot hops: node -> peer node, and node -> engine.

aiohttp's ClientSession costs ~0.3 ms of CPU per request on a 2-core machine (request and
response objects, tracing hooks, cookie jar, a general parser); measured on loopback, that
was half of what forwarding added. Both ends of these hops are ours (an aiohttp server: the
peer node or the engine host), so this client speaks only what they send back:

    status line, headers (<= HEAD_MAX bytes), then a body framed by Content-Length,
    by chunked transfer encoding, or by the end of the connection.

One request in flight per connection; idle connections are kept per address (Unix socket
path, or host/port with or without TLS) for IDLE_S and reused. A reused connection that the
peer closed while idle gives EOF before any byte of the answer: the request is then sent
once more on a fresh connection (a server closes only idle connections, so the first copy
was never processed). A response whose body was not read to the end, or that was cancelled,
closes its connection instead of returning it to the pool: the peer sees the client go away
and cancels its work.

Reading applies backpressure: past BUFFER_HIGH unread bytes the socket stops being read, so
a slow client slows the engine instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, Self

import msgspec

__all__ = ["Unreachable", "Upstream", "UpstreamError", "UpstreamResponse", "encode_request"]

HEAD_MAX = 64 * 1024
"""Largest response head (status line + headers) accepted."""
BUFFER_HIGH = 256 * 1024
"""Unread bytes above which reading from the socket pauses (backpressure)."""
IDLE_S = 30.0
"""How long an idle connection is kept; under the aiohttp server's 75 s keep-alive."""
IDLE_MAX = 64
"""Idle connections kept per address; more are closed when released."""
KEEPALIVE = (15, 5, 3)
"""TCP keepalive on connections to peers: probe after 15 s of silence, every 5 s, give up
after 3 unanswered, or once probes went unanswered for UNACKED_S (Linux: that comes first):
a peer this node cannot reach any more (a cable, a one-way partition that membership does not
see, since others still reach it) breaks its connections in 20-30 s instead of leaving an
answer waited for for ever. A frozen process's kernel still answers probes: membership
covers that (Upstream.drop)."""
UNACKED_S = 10.0
"""TCP_USER_TIMEOUT on connections to peers (Linux): a connection whose sent bytes stay
unacknowledged this long breaks. Keepalive only probes an idle connection; a request written
on a pooled connection into a path that broke meanwhile would otherwise wait for TCP's
retransmissions to give up (~15 min). The peer's kernel acknowledges at once whatever its
engine does, so only a broken path reaches it; lower fails over sooner, higher forgives longer
bursts of loss."""
SILENT_S = 1.0
"""An answer from a peer that is likely not answering any more (Upstream.drop_unanswered) is
cut off when nothing more of it arrives for this long: its stream has stalled with its peer.
An answer still flowing is left to finish. Higher spares engines that pause longer between
two chunks; lower ends a stalled stream sooner."""


class Feed(Protocol):
    """Takes a connection's bytes instead of its buffer (splice.py)."""

    def feed(self, data: bytes) -> None: ...

    def lost(self, exc: Exception | None) -> None: ...


class UpstreamError(ConnectionError):
    """The upstream could not be reached, or broke the HTTP framing, or went away."""


class Unreachable(UpstreamError):
    """No connection could be opened to the upstream (refused, timed out, no route, or its
    TLS handshake failed), or the one a request was written on timed out before any answer
    (UNACKED_S): the path to the upstream is broken."""


class _Conn(asyncio.Protocol):
    """One connection: bytes in a buffer, a waiter woken when more arrive or it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.received = 0  # bytes received since the current request was sent
        self.idle_since = 0.0
        self.splice: Feed | None = None  # while set, bytes go there instead of buf
        self.gone = ""  # why it was dropped (Upstream.drop): nothing is stale, go elsewhere
        self.movable = True  # its request has another replica to try (drop_unanswered)
        self.loop = asyncio.get_running_loop()
        """Kept: each get_running_loop() costs a getpid() syscall on Python 3.11."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.splice is not None:
            self.splice.feed(data)
            return
        self.buf += data
        if len(self.buf) > BUFFER_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self.splice is not None:
            self.splice.lost(None)
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self.transport = None
        if self.splice is not None:
            self.splice.lost(exc)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.eof

    async def more(self) -> None:
        """Wait for more bytes (or the end); resumes reading if it was paused."""
        if self.eof:
            raise UpstreamError(f"upstream closed the connection: {self.error or 'EOF'}")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if self.paused and len(self.buf) <= BUFFER_HIGH // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.eof = True


class UpstreamResponse:
    """Status and headers of an answer; the body is read with `read()` or `iter_chunks()`,
    once. Use as an async context manager: leaving it releases or closes the connection."""

    def __init__(self, upstream: Upstream, key: str, conn: _Conn, status: int,
                 headers: dict[str, str], framing: str, length: int) -> None:
        self._upstream = upstream
        self._key = key
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers  # lower-case names
        self._framing = framing  # "length" | "chunked" | "close"
        self._left = length      # body bytes left ("length"), or in the current chunk
        self._done = framing == "length" and length == 0
        self._keep_alive = headers.get("connection", "").lower() != "close"

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session this answer came over (its peer certificate), or None."""
        conn = self._conn
        if conn is None or conn.transport is None:
            return None
        return conn.transport.get_extra_info("ssl_object")

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Back to the pool when the body was read to its end; otherwise closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive and self._framing != "close" and not conn.buf:
            self._upstream._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the peer sees us go away)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def json(self) -> Any:
        """The body decoded as JSON; UpstreamError if it is not JSON."""
        try:
            return msgspec.json.decode(await self.read())
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"upstream answered invalid JSON: {exc}") from None

    async def read(self) -> bytes:
        conn = self._conn
        if (conn is not None and self._framing == "length" and not self._done
                and len(conn.buf) >= self._left):  # all there already (small answers)
            data = conn.take(self._left)
            self._left, self._done = 0, True
            return data
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer framing removed)."""
        conn = self._conn
        if conn is None:
            raise UpstreamError("response already released")
        while not self._done:
            match self._framing:
                case "length":
                    while not conn.buf:
                        await conn.more()
                    data = conn.take(min(self._left, len(conn.buf)))
                    self._left -= len(data)
                    self._done = self._left == 0
                    yield data
                case "chunked":
                    if self._left == 0:
                        self._left = await self._chunk_size(conn)
                        if self._left == 0:
                            await self._trailer(conn)
                            self._done = True
                            return
                    while not conn.buf:
                        await conn.more()
                    data = conn.take(min(self._left, len(conn.buf)))
                    self._left -= len(data)
                    if self._left == 0:
                        await self._line(conn)  # the CRLF after the chunk
                    yield data
                case _:  # "close": until EOF
                    if conn.buf:
                        yield conn.take(len(conn.buf))
                    elif conn.eof:
                        self._done = True
                    else:
                        try:
                            await conn.more()
                        except UpstreamError:
                            self._done = True

    @staticmethod
    async def _line(conn: _Conn) -> bytes:
        while (i := conn.buf.find(b"\r\n")) < 0:
            if len(conn.buf) > 4096:
                raise UpstreamError("chunk framing line too long")
            await conn.more()
        return conn.take(i + 2)[:-2]

    async def _chunk_size(self, conn: _Conn) -> int:
        line = await self._line(conn)
        try:
            size = int(line.partition(b";")[0].strip(), 16)
        except ValueError:
            raise UpstreamError(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise UpstreamError("negative chunk size")
        return size

    async def _trailer(self, conn: _Conn) -> None:
        while await self._line(conn):
            pass


def timed_out(exc: BaseException | None) -> bool:
    """Whether a connection was lost to a timeout (keepalive, UNACKED_S): its path broke, as
    opposed to a peer that closed it or reset it."""
    return isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT


def _keepalive(sock: Any) -> None:
    """Turn on TCP keepalive (KEEPALIVE) and the unacknowledged-data timeout (UNACKED_S)
    where the platform lets us tune them."""
    if sock is None:
        return
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPALIVE", idle),  # Linux, macOS
                        ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count),
                        ("TCP_USER_TIMEOUT", int(UNACKED_S * 1000))):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


class Upstream:
    """Pooled keep-alive connections to HTTP servers we run (peer nodes, engine hosts).

    Addresses are `unix:/path/to.sock`, `http://host:port` or `https://host:port` (with the
    `ssl` context given here: node-to-node mTLS)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout_s: float = 5.0) -> None:
        self._ssl = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[str, deque[_Conn]] = {}
        self._open: dict[str, weakref.WeakSet[_Conn]] = {}  # address -> its connections
        self._stall_checks: dict[object, asyncio.TimerHandle] = {}  # drop_unanswered's
        self._closed = False

    async def close(self) -> None:
        """Close every idle connection; safe to call twice."""
        self._closed = True
        for check in self._stall_checks.values():
            check.cancel()
        self._stall_checks.clear()
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def drop(self, base: str) -> int:
        """The server at `base` is gone (membership declared its node dead): close its idle
        connections and abort those in use. A request on one that has no answer yet fails
        (the caller tries another replica) instead of waiting on a peer that will never
        answer; an answer cut short ends as any broken answer does. How many connections
        were aborted."""
        for conn in self._idle.pop(base, ()):
            conn.close()
        aborted = 0
        for conn in list(self._open.pop(base, ())):
            if conn.transport is not None:
                conn.gone = "its node was declared dead"
                conn.close()
                aborted += 1
        return aborted

    def drop_unanswered(self, base: str, why: str) -> int:
        """The server at `base` is likely not answering (`why`: this node cannot connect
        there, or membership has suspected its node for a while: node/peers.py): close its
        idle connections and abort those whose request has no byte of answer yet and
        another replica to try (`movable`), which then fail over as with `drop` instead of
        waiting out UNACKED_S, keepalive or a death. An answer under way is cut off (as any
        broken answer ends) if nothing more of it arrives within SILENT_S, unless this node
        stopped reading it (a slow client). Requests with nowhere else to go keep waiting.
        How many were aborted now."""
        for conn in self._idle.pop(base, ()):
            conn.close()
        aborted, answering = 0, {}
        for conn in list(self._open.get(base, ())):
            if conn.transport is None:
                continue
            if conn.received:
                answering[conn] = conn.received
            elif conn.movable:
                conn.gone = why
                conn.close()
                aborted += 1
        if answering:
            key = object()
            self._stall_checks[key] = asyncio.get_running_loop().call_later(
                SILENT_S, self._cut_stalled, key, answering, why)
        return aborted

    def _cut_stalled(self, key: object, marks: dict[_Conn, int], why: str) -> None:
        self._stall_checks.pop(key, None)
        for conn, received in marks.items():  # no byte since: the count did not move
            if conn.transport is not None and conn.received == received \
                    and not conn.paused and conn.transport.is_reading():
                conn.gone = why
                conn.close()

    def _put(self, key: str, conn: _Conn) -> None:
        conns = self._idle.setdefault(key, deque())
        if self._closed or len(conns) >= IDLE_MAX:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    def _get(self, key: str) -> _Conn | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()  # most recently used first: least likely to have timed out
            if conn.usable and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def _connect(self, base: str) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if base.startswith("unix:"):
                    _, conn = await loop.create_unix_connection(_Conn, base[5:])
                else:
                    scheme, _, hostport = base.partition("://")
                    host, _, port = hostport.rpartition(":")
                    tls = self._ssl if scheme == "https" else None
                    if scheme == "https" and tls is None:
                        raise UpstreamError(f"{base}: https needs an ssl context")
                    transport, conn = await loop.create_connection(
                        _Conn, host.strip("[]"), int(port), ssl=tls)
                    _keepalive(transport.get_extra_info("socket"))
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            raise Unreachable(f"cannot connect to {base}: {exc!r}") from exc
        self._open.setdefault(base, weakref.WeakSet()).add(conn)
        return conn

    async def request(self, method: str, base: str, path: str, body: bytes = b"",
                      headers: Mapping[str, str] | bytes | None = None, *,
                      movable: bool = True) -> UpstreamResponse:
        """Send one request to `base` (an address as above) and read the answer's head;
        `movable`: the caller has another upstream to try if this one is dropped before it
        answers (drop_unanswered).

        UpstreamError when the upstream cannot be reached or breaks off before its head."""
        data = encode_request(method, base, path, body, headers)
        conn = self._get(base)
        if conn is not None:
            try:
                return await self._exchange(base, conn, data, movable)
            except _Stale:
                pass  # closed by the peer while idle: the request was never processed
        try:
            return await self._exchange(base, await self._connect(base), data, movable)
        except _Stale:
            raise UpstreamError(f"{base} closed the connection without answering") from None

    async def _exchange(self, base: str, conn: _Conn, data: bytes,
                        movable: bool) -> UpstreamResponse:
        try:
            assert conn.transport is not None
            conn.received, conn.movable = 0, movable
            conn.transport.write(data)
            while (end := conn.buf.find(b"\r\n\r\n")) < 0:
                if len(conn.buf) > HEAD_MAX:
                    raise UpstreamError(f"{base}: response head over {HEAD_MAX} bytes")
                if conn.gone:
                    raise UpstreamError(f"{base}: {conn.gone}")
                if conn.eof and conn.received == 0:
                    if timed_out(conn.error):  # sent into a path that broke (UNACKED_S)
                        raise Unreachable(f"{base}: no answer, connection timed out")
                    raise _Stale
                await conn.more()
            head = conn.take(end + 4)[:-4].decode("latin-1").split("\r\n")
            version, _, rest = head[0].partition(" ")
            if not version.startswith("HTTP/1."):
                raise UpstreamError(f"{base}: not an HTTP/1.x answer: {head[0][:40]!r}")
            status = int(rest[:3])
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                framing, length = "chunked", 0
            elif "content-length" in headers:
                framing, length = "length", int(headers["content-length"])
                if length < 0:
                    raise ValueError("negative content-length")
            else:
                framing, length = "close", 0
        except _Stale:
            conn.close()
            raise
        except UpstreamError:
            conn.close()
            raise
        except ValueError as exc:
            conn.close()
            raise UpstreamError(f"{base}: malformed response head: {exc}") from None
        except BaseException:
            conn.close()  # cancelled while waiting: the peer sees us go away
            raise
        return UpstreamResponse(self, base, conn, status, headers, framing, length)


def encode_request(method: str, base: str, path: str, body: bytes,
                   headers: Mapping[str, str] | bytes | None) -> bytes:
    """A request's bytes. `headers` as a mapping (checked for line breaks), or as header
    lines already encoded, each ending in CRLF (the caller vouches for them)."""
    host = "localhost" if base.startswith("unix:") else base.partition("://")[2]
    start = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    if isinstance(headers, bytes):
        return start.encode("latin-1") + headers + b"\r\n" + body
    head = [start]
    for k, v in (headers or {}).items():
        if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
            raise ValueError(f"header {k!r} contains a line break")
        head.append(f"{k}: {v}\r\n")
    return "".join(head).encode("latin-1") + b"\r\n" + body


class _Stale(Exception):
    """A pooled connection was closed by the peer before it answered anything."""
