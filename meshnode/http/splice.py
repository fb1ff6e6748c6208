"""Splicing: an upstream answer written to a client socket as it arrives, framing and all.

Used by the front (front.py) to pass a peer node's answer on. The upstream connection's
data_received hands each read to a `_Splice`, which writes it to the client transport and
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

from .upstream import HEAD_MAX, Upstream, UpstreamError, _Conn, encode_request

__all__ = ["SpliceHandle", "Spliced", "splice", "splice_now"]


async def splice(pool: Upstream, method: str, base: str, path: str, body: bytes,
                 headers: Mapping[str, str] | None, out: asyncio.Transport, *,
                 extra_head: bytes = b"", retry_503: bool = False,
                 check: Callable[[ssl.SSLObject | None], bool] | None = None,
                 on_source: Callable[[asyncio.Transport | None], None] | None = None,
                 ) -> Spliced:
    """Send one request and write its answer, framing and all, to `out` as it arrives.

    No task wakes per chunk: the connection's data_received writes to `out` directly and
    counts the framing (Content-Length or chunked) to know where the answer ends, then the
    connection goes back to the pool. `extra_head` is inserted after the status line.
    Before anything is written: a 503 with `retry_503`, or a connection that `check`s
    refuses (its TLS session), or one that fails, gives an outcome to try elsewhere
    ("retry", "refused", "failed"); `on_source` is told the upstream transport while the
    answer flows (the client side pauses and resumes its reading: backpressure)."""
    args = (method, base, path, body, headers, out, extra_head, retry_503, check, on_source)
    handle = splice_now(pool, *args)
    if handle is not None:
        done = await handle.wait()
        if done.outcome != "stale":
            return done
    try:  # no idle connection, or it had been closed while idle: a fresh one
        conn = await pool._connect(base)
    except UpstreamError:
        return Spliced("failed")
    handle = _begin(pool, conn, *args)
    if handle is None:
        return Spliced("refused")
    done = await handle.wait()
    return Spliced("failed") if done.outcome == "stale" else done

def splice_now(pool: Upstream, method: str, base: str, path: str, body: bytes,
               headers: Mapping[str, str] | None, out: asyncio.Transport,
               extra_head: bytes = b"", retry_503: bool = False,
               check: Callable[[ssl.SSLObject | None], bool] | None = None,
               on_source: Callable[[asyncio.Transport | None], None] | None = None,
               ) -> SpliceHandle | None:
    """`splice` without awaiting: on an idle pooled connection only (None when there is
    none, or `check` refuses it), the request is written before this returns. The handle's
    `done` resolves with how it ended ("stale": the pooled connection had been closed by
    the peer and nothing was processed; try `splice`); then call its `finish()`."""
    conn = pool._get(base)
    if conn is None:
        return None
    return _begin(pool, conn, method, base, path, body, headers, out, extra_head,
                       retry_503, check, on_source)

def _begin(pool: Upstream, conn: _Conn, method: str, base: str, path: str, body: bytes,
           headers: Mapping[str, str] | None, out: asyncio.Transport, extra_head: bytes,
           retry_503: bool, check: Callable[[ssl.SSLObject | None], bool] | None,
           on_source: Callable[[asyncio.Transport | None], None] | None,
           ) -> SpliceHandle | None:
    transport = conn.transport
    if transport is None or (check is not None
                             and not check(transport.get_extra_info("ssl_object"))):
        conn.close()
        return None
    data = encode_request(method, base, path, body, headers)
    splice = conn.splice = _Splice(out, extra_head, retry_503, conn.loop)
    transport.write(data)
    if on_source is not None:
        on_source(transport)
    return SpliceHandle(pool, base, conn, splice, on_source)


class SpliceHandle:
    """A splice in flight (splice_now)."""

    __slots__ = ("_base", "_conn", "_on_source", "_splice", "_upstream")

    def __init__(self, upstream: Upstream, base: str, conn: _Conn, splice: _Splice,
                 on_source: Callable[[asyncio.Transport | None], None] | None) -> None:
        self._upstream = upstream
        self._base = base
        self._conn = conn
        self._splice = splice
        self._on_source = on_source

    @property
    def done(self) -> asyncio.Future[Spliced]:
        return self._splice.done

    def finish(self) -> Spliced:
        """Once `done`: the connection goes back to the pool (a whole answer, reusable) or is
        closed; how the splice ended."""
        conn = self._conn
        conn.splice = None
        if self._on_source is not None:
            self._on_source(None)
            self._on_source = None
        done = self._splice.done.result()
        if done.outcome == "done" and done.keep_alive and conn.transport is not None:
            conn.received = 0
            self._upstream._put(self._base, conn)
        else:
            conn.close()
        return done

    def abort(self) -> None:
        """Drop the upstream connection now (the client went away): the peer sees it."""
        self._conn.close()
        self._splice.lost(None)

    async def wait(self) -> Spliced:
        try:
            await self._splice.done
        except BaseException:
            self.abort()  # cancelled: the peer sees us go away
            self.finish()
            raise
        return self.finish()


class Spliced:
    """How a splice ended: "done" (the whole answer passed), "broken" (the upstream failed
    after part of it was written; `at_boundary`: between two chunks of a chunked body, where
    a last event and the end of the body can still be written), or, with nothing written,
    "retry" (503), "refused" (check failed), "failed" (unreachable, or closed early)."""

    __slots__ = ("at_boundary", "keep_alive", "outcome", "status")

    def __init__(self, outcome: str, status: int = 0, keep_alive: bool = False,
                 at_boundary: bool = False) -> None:
        self.outcome = outcome
        self.status = status
        self.keep_alive = keep_alive
        self.at_boundary = at_boundary


class _Splice:
    """The framing counter of one spliced answer (see splice)."""

    __slots__ = ("done", "extra", "framing", "head", "keep_alive", "left", "line", "out",
                 "received", "retry_503", "started", "status", "trailer")

    def __init__(self, out: asyncio.Transport, extra: bytes, retry_503: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.out = out
        self.extra = extra
        self.retry_503 = retry_503
        self.done: asyncio.Future[Spliced] = loop.create_future()
        self.head = bytearray()
        self.started = False  # the head was written to `out`
        self.received = 0
        self.status = 0
        self.framing = ""     # "length" | "chunked" | "close"
        self.left = 0         # body bytes left ("length"), or of the chunk + its CRLF
        self.line = bytearray()  # a chunk-size or trailer line split across reads
        self.trailer = False
        self.keep_alive = True

    def _finish(self, outcome: str, at_boundary: bool = False) -> None:
        if not self.done.done():
            self.done.set_result(Spliced(outcome, self.status, self.keep_alive, at_boundary))

    def feed(self, data: bytes) -> None:
        if self.done.done():
            return
        self.received += len(data)
        try:
            out = b""  # the rewritten head, written with the body that came with it
            if not self.started:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > HEAD_MAX:
                        raise UpstreamError(f"response head over {HEAD_MAX} bytes")
                    return
                head, data = bytes(self.head[:end + 4]), bytes(self.head[end + 4:])
                self.head = bytearray()
                out = self._start(head)
                if self.done.done():  # refused (retry), or a head-only answer
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
            self.line = bytearray()
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
        if self.done.done():
            return
        self.keep_alive = False
        if not self.started:
            self._finish("stale" if self.received == 0 else "failed")
        elif self.framing == "close":
            self._finish("done")
        else:
            at_boundary = self.framing == "chunked" and not self.left and not self.line \
                and not self.trailer
            self._finish("broken", at_boundary)
