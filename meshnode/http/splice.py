"""Splicing: an upstream answer written to a client socket as it arrives, framing and all.

Used by the front (front.py) to pass a peer node's answer on. The upstream connection's
data_received hands each read to a `Splice`, which writes it to the client transport and
counts the answer's framing (Content-Length, or chunk sizes and the trailer) to know where it
ends; then the connection goes back to the pool (upstream.py). No task wakes per chunk, and
the head is not parsed into objects and rebuilt: only the status and the framing fields are
read. Before anything is written, a 503 (when asked), a refused TLS peer, or a connection that
fails or was closed while idle gives an outcome that lets the caller try elsewhere.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Protocol

from .upstream import HEAD_MAX, Upstream, UpstreamError, _Conn, encode_request, timed_out

__all__ = ["Splice", "Spliced", "Watcher", "splice", "splice_now"]


class Watcher(Protocol):
    """Told once how a splice ended (splice_now), from the upstream connection's callbacks;
    it then calls the splice's `finish()`."""

    def on_done(self, done: Spliced) -> None: ...


async def splice(pool: Upstream, method: str, base: str, path: str, body: bytes,
                 headers: Mapping[str, str] | bytes | None, out: asyncio.Transport, *,
                 extra_head: bytes = b"", retry_503: bool = False,
                 check: Callable[[ssl.SSLObject | None], bool] | None = None,
                 on_source: Callable[[asyncio.Transport | None], None] | None = None,
                 ) -> Spliced:
    """Send one request and write its answer, framing and all, to `out` as it arrives.

    No task wakes per chunk: the connection's data_received writes to `out` directly and
    counts the framing (Content-Length or chunked) to know where the answer ends, then the
    connection goes back to the pool. `extra_head` is inserted after the status line.
    Before anything is written: a 503 with `retry_503`, or a connection that `check`s
    refuses (its TLS session), or one that cannot be opened or fails, gives an outcome to try
    elsewhere ("retry", "refused", "unreachable", "failed"); `on_source` is told the upstream
    transport while the answer flows (the client side pauses and resumes its reading:
    backpressure)."""
    data = encode_request(method, base, path, body, headers)
    loop = asyncio.get_running_loop()
    waiter = _Waiter(loop)
    started = splice_now(pool, base, data, out, extra_head, retry_503, check, waiter)
    if started is not None:
        done = await waiter.wait(started, on_source)
        if done.outcome != "stale":
            return done
    try:  # no idle connection, or it had been closed while idle: a fresh one
        conn = await pool._connect(base)
    except UpstreamError:
        return Spliced("unreachable")
    waiter = _Waiter(loop)
    started = _begin(pool, base, conn, data, out, extra_head, retry_503, check, waiter)
    if started is None:
        return Spliced("refused")
    done = await waiter.wait(started, on_source)
    return Spliced("failed") if done.outcome == "stale" else done


def splice_now(pool: Upstream, base: str, data: bytes, out: asyncio.Transport,
               extra_head: bytes, retry_503: bool,
               check: Callable[[ssl.SSLObject | None], bool] | None,
               watcher: Watcher) -> Splice | None:
    """`splice` without awaiting, of a request already encoded (`data`): on an idle pooled
    connection only (None when there is none, or `check` refuses it), the request is
    written before this returns. The watcher's `on_done` says how it ended ("stale": the
    pooled connection had been closed by the peer and nothing was processed; try
    `splice`). While it runs, `Splice.source` is the upstream transport (to pause while
    `out` is above its high-water mark: backpressure)."""
    conn = pool._get(base)
    if conn is None:
        return None
    return _begin(pool, base, conn, data, out, extra_head, retry_503, check, watcher)


def _begin(pool: Upstream, base: str, conn: _Conn, data: bytes, out: asyncio.Transport,
           extra_head: bytes, retry_503: bool,
           check: Callable[[ssl.SSLObject | None], bool] | None,
           watcher: Watcher) -> Splice | None:
    transport = conn.transport
    if transport is None or (check is not None
                             and not check(transport.get_extra_info("ssl_object"))):
        conn.close()
        return None
    conn.received, conn.movable = 0, retry_503  # for Upstream.drop_unanswered
    transport.write(data)  # first: the answer cannot arrive before this returns to the loop
    started = conn.splice = Splice(pool, base, conn, out, extra_head, retry_503, watcher)
    return started


class _Waiter:
    """The Watcher of an awaited splice."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Spliced] = loop.create_future()

    def on_done(self, done: Spliced) -> None:
        if not self.future.done():
            self.future.set_result(done)

    async def wait(self, started: Splice, on_source: Callable[[asyncio.Transport | None],
                                                              None] | None) -> Spliced:
        if on_source is not None:
            on_source(started.source)
        try:
            await self.future
        except BaseException:
            started.abort()  # cancelled: the peer sees us go away
            started.finish()
            raise
        finally:
            if on_source is not None:
                on_source(None)
        return started.finish()


class Spliced:
    """How a splice ended: "done" (the whole answer passed), "broken" (the upstream failed
    after part of it was written; `at_boundary`: between two chunks of a chunked body, where
    a last event and the end of the body can still be written), or, with nothing written,
    "retry" (503), "refused" (check failed), "unreachable" (no connection opened), "failed"
    (closed before the answer began)."""

    __slots__ = ("at_boundary", "keep_alive", "outcome", "status")

    def __init__(self, outcome: str, status: int = 0, keep_alive: bool = False,
                 at_boundary: bool = False) -> None:
        self.outcome = outcome
        self.status = status
        self.keep_alive = keep_alive
        self.at_boundary = at_boundary


class Splice:
    """One answer in flight: the framing counter fed by the upstream connection (see the
    module docstring). The state fields start at their class-level defaults (one
    assignment less each per request: this runs on every forwarded request)."""

    head = b""          # the start of a head split across reads
    started = False     # the head was written to `out`
    received = 0
    status = 0
    framing = ""        # "length" | "chunked" | "close"
    left = 0            # body bytes left ("length"), or of the chunk + its CRLF
    line = b""          # a chunk-size or trailer line split across reads
    trailer = False
    keep_alive = True
    result: Spliced | None = None

    def __init__(self, pool: Upstream, base: str, conn: _Conn, out: asyncio.Transport,
                 extra: bytes, retry_503: bool, watcher: Watcher | None) -> None:
        self.pool, self.base, self.conn, self.out = pool, base, conn, out
        self.extra, self.retry_503, self.watcher = extra, retry_503, watcher

    @property
    def source(self) -> asyncio.Transport | None:
        """The upstream transport, while the answer flows."""
        return self.conn.transport

    def finish(self) -> Spliced:
        """Once done: the connection goes back to the pool (a whole answer, reusable) or is
        closed; how the splice ended."""
        conn, done = self.conn, self.result
        assert done is not None, "finish() before the splice ended"
        conn.splice = None
        if done.keep_alive and done.outcome == "done" and conn.transport is not None:
            conn.received = 0
            self.pool._put(self.base, conn)
        else:
            conn.close()
        return done

    def abort(self) -> None:
        """Drop the upstream connection now (the client went away): the peer sees it."""
        self.conn.close()
        self.lost(None)

    def _finish(self, outcome: str, at_boundary: bool = False) -> None:
        """Record how it ended (the first outcome counts); _tell passes it on once the bytes
        that go with it are written."""
        if self.result is None:
            self.result = Spliced(outcome, self.status, self.keep_alive, at_boundary)

    def _tell(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None and self.result is not None:
            watcher.on_done(self.result)

    def feed(self, data: bytes) -> None:
        if self.result is None:
            self._feed(data)
            if self.result is not None:
                self._tell()

    def _feed(self, data: bytes) -> None:
        self.received += len(data)
        try:
            out = b""  # the rewritten head, written with the body that came with it
            if not self.started:
                if self.head:
                    data = self.head + data
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > HEAD_MAX:
                        raise UpstreamError(f"response head over {HEAD_MAX} bytes")
                    self.head = data
                    return
                self.head = b""
                out = self._start(data[:end + 4])
                data = data[end + 4:]
                if self.result is not None:  # refused (retry), or a head-only answer
                    if out:
                        self.out.write(out)
                    return
            end = self._scan(data) if data else -1
            if end < 0:
                if out or data:
                    self.out.write(out + data)  # one write: one syscall, one segment
                return
            self.out.write(out + data[:end])
            if end < len(data):
                self.keep_alive = False  # bytes after the answer: do not reuse
            self._finish("done")
        except (UpstreamError, ValueError):
            if self.started and out:
                self.out.write(out)  # the head, then the body's bad framing: "broken"
            self.keep_alive = False
            self._finish("broken" if self.started else "failed")

    def _start(self, head: bytes) -> bytes:
        """Read the answer's head; the head to write to the client (with `extra`), or b""
        when the answer is refused (a 503 to retry elsewhere: done with "retry")."""
        if not head.startswith(b"HTTP/1.") or head[8:9] != b" ":
            raise UpstreamError(f"not an HTTP/1.x answer: {head[:40]!r}")
        self.status = int(head[9:12])
        if self.status == 503 and self.retry_503:
            self.keep_alive = False
            self._finish("retry")
            return b""
        fields = head.lower()
        if b"\r\ntransfer-encoding:" in fields:
            if b"chunked" not in fields.partition(b"\r\ntransfer-encoding:")[2].partition(
                    b"\r\n")[0]:
                raise UpstreamError("unsupported transfer-encoding")
            self.framing = "chunked"
        elif b"\r\ncontent-length:" in fields:
            self.framing = "length"
            self.left = int(fields.partition(b"\r\ncontent-length:")[2].partition(b"\r\n")[0])
            if self.left < 0:
                raise ValueError("negative content-length")
        else:
            self.framing, self.keep_alive = "close", False
        if b"\r\nconnection: close" in fields:
            self.keep_alive = False
        line = head.find(b"\r\n") + 2
        self.started = True
        if self.framing == "length" and self.left == 0:
            self._finish("done")
        return head[:line] + self.extra + head[line:]

    def _scan(self, data: bytes) -> int:
        """Where the body ends in `data` (index after its last byte), or -1 if it goes on."""
        if self.framing == "length":
            if len(data) < self.left:
                self.left -= len(data)
                return -1
            end, self.left = self.left, 0
            return end
        if self.framing == "close":
            return -1
        i, n = 0, len(data)
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > 4096:
                    raise UpstreamError("chunk framing line too long")
                return -1
            line = (bytes(self.line) + data[i:j]).rstrip(b"\r")
            self.line = b""
            i = j + 1
            if self.trailer:
                if not line:
                    return i
                continue
            size = int(line.partition(b";")[0].strip(), 16)
            if size < 0:
                raise ValueError("negative chunk size")
            if size == 0:
                self.trailer = True
            else:
                self.left = size + 2  # the data and its CRLF
        return -1

    def lost(self, exc: Exception | None) -> None:
        """The upstream closed or broke."""
        if self.result is None:
            self._lost(exc)
        self._tell()

    def _lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        if not self.started:  # stale: closed while idle, so never processed: same peer again
            if self.received or self.conn.gone:
                self._finish("failed")
            else:  # unless the path timed out (upstream.UNACKED_S): then nothing goes there
                self._finish("unreachable" if timed_out(exc) else "stale")
        elif self.framing == "close":
            self._finish("done")
        else:
            at_boundary = self.framing == "chunked" and not self.left and not self.line \
                and not self.trailer
            self._finish("broken", at_boundary)
