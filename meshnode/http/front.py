"""The public port's front: the fast path of inference requests, below aiohttp.

Every connection to the public port starts here. An asyncio protocol reads HTTP/1.1 requests
and serves those it can serve on its own: a POST to an inference route, with a Content-Length
body that decodes and passes the API key check. A request whose replica is on a peer with an
idle pooled connection is spliced there without a task (`_splice_now`): the peer checks it
(what it asks, whether the deployment serves the route) and refuses it exactly as this node
would, so only one node does that work. Otherwise, once it is checked here and names a
deployment that serves the route, a task calls passthrough.dispatch with a Sink that writes
straight to the socket. The signed cluster's internal listener (mTLS) starts at a front too:
there every request was forwarded by a peer, whose certificate is checked on each request (else
hand-over: internal.py answers 403).

Anything else is handed over: another route, a malformed, oversized or unauthenticated request,
a chunked upload, HTTP/1.0, `Expect`, `Upgrade`, a query string, a head over HEAD_MAX. The
connection's transport, with every byte read and not yet answered, goes to a protocol of the
aiohttp app's server, which owns that connection from then on and answers exactly as it always
did (its error bodies, 413, 401/403, the web UI). The front itself renders only the errors
raised while dispatching (no replica ready, engine crashed), with errors.exception_parts like
the app. A hand-over happens only between requests (nothing of the current one answered yet).

Why: on the 2-core test machine, aiohttp's server costs ~0.25 ms of CPU per request before any
handler runs, and forwarding through it added 1.1-1.3 ms where nginx adds 0.3 ms
(bench/routing.py). On that machine each line of Python the forwarding path runs costs about
0.7 us (the interpreter runs cold between two engine processes on 2 cores): a bare uvloop proxy
adds less than nginx, and the time forwarding adds tracks the lines run per request (in
December 2026, ~285 lines of meshnode code per forwarded request: 2.1x nginx's added latency;
~220 after the splice path was made lean: 1.8x). Keep a line off this path when it can run
elsewhere. Keep-alive: a connection idle for KEEPALIVE_S is closed, as aiohttp does. A client
that goes away cancels the task answering it (as aiohttp's handler_cancellation), which closes
the upstream connection. Responses are written as the upstream gives them; `write` waits while
the socket is above its high-water mark (backpressure).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import structlog
from aiohttp import web

from meshnode.engines import (
    EngineError,
    InvalidRequest,
    decode_request,
)
from meshnode.mesh.crypto_errors import SecurityError
from meshnode.node import NodeError, request_key

from .auth import inference_allowed, keys_required
from .errors import error_parts, exception_parts
from .forward import ENGINE_UPSTREAM, FORWARD_UPSTREAM, HOP_MODE
from .http1 import Request, head, parse
from .keys import NODE
from .middleware import request_id
from .passthrough import (
    PREFIX_PATHS,
    Call,
    dispatch,
    effective_hop,
    forward_headers,
    tls_check,
    upstream_lost_event,
)
from .splice import Splice, Spliced, splice_now
from .upstream import encode_request

__all__ = ["HEAD_MAX", "KEEPALIVE_S", "FrontSite"]

log = structlog.get_logger("meshnode.http")

HEAD_MAX = 16 * 1024
"""Longest request head (request line + headers) the front reads; longer ones are handed over."""
KEEPALIVE_S = 75.0
"""An idle keep-alive connection is closed after this long (aiohttp's default), give or take
a quarter of it (one sweep of every connection per quarter, not a timer per request)."""
PIPELINE_MAX = 1024 * 1024
"""Bytes of further requests buffered while one is answered; above it reading pauses."""

class _Front:
    """Per listener: the node, the app's pools and server, the open connections."""

    def __init__(self, app: web.Application, server: web.Server) -> None:
        node = app[NODE]
        self.node = node
        self.server = server
        self.peers = app.get(FORWARD_UPSTREAM)
        self.engines = app[ENGINE_UPSTREAM]
        self.mode = app.get(HOP_MODE, "open")
        self.keys_required = keys_required(node.config) and self.mode != "internal"
        self.max_body = node.config.max_body_bytes
        self.conns: set[_Conn] = set()
        self.closing = False
        self.loop = asyncio.get_running_loop()
        self._sweeper = self.loop.call_later(KEEPALIVE_S / 4, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE_S (checked every KEEPALIVE_S / 4)."""
        deadline = self.loop.time() - KEEPALIVE_S
        for conn in [c for c in self.conns if not c.busy and c.idle_since < deadline]:
            conn.abort()
        self._sweeper = self.loop.call_later(KEEPALIVE_S / 4, self._sweep)

    async def close(self, timeout_s: float) -> None:
        """Close idle connections now; give busy ones `timeout_s` to finish, then cut them."""
        self.closing = True
        self._sweeper.cancel()
        for conn in list(self.conns):
            if not conn.busy:
                conn.abort()
        busy: list[asyncio.Future[Any]] = [c.task for c in self.conns if c.task is not None]
        busy += [c.active.done for c in self.conns if c.active is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for conn in list(self.conns):
            conn.abort()


class _Conn(asyncio.Protocol):
    """One client connection while the front owns it."""

    def __init__(self, front: _Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: Request | None = None  # head parsed, body still arriving
        self.head_end = 0
        self.task: asyncio.Task[None] | None = None
        self.active: Splice | None = None  # a peer's answer spliced in, without a task
        # while `active`: (request, request id, deployment, target, path, body, key, close)
        self.forwarding: tuple[Any, ...] | None = None
        self.idle_since = 0.0  # loop time the connection last became idle
        self.reading_paused = False
        self.writable: asyncio.Future[None] | None = None  # set while writing is paused
        self.source: asyncio.Transport | None = None  # an upstream spliced in by a task
        self.paused: asyncio.Transport | None = None  # the upstream paused for backpressure
        self.gone = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.conns.add(self)
        self.idle_since = self.front.loop.time()

    @property
    def busy(self) -> bool:
        return self.task is not None or self.active is not None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()
        elif len(self.buf) > PIPELINE_MAX and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False  # the transport closes; an answer in progress is cancelled

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None
        self.front.conns.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.active is not None:
            self.active.abort()  # its callback sees `gone`
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ConnectionResetError("client went away"))

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = asyncio.get_running_loop().create_future()
        source = self.source if self.active is None else self.active.source
        if source is not None and self.paused is None:
            self.paused = source
            source.pause_reading()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None
        self._unpause()

    def _unpause(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None:
            paused.resume_reading()  # (and it goes back to the pool readable)

    def on_source(self, source: asyncio.Transport | None) -> None:
        """The upstream transport an answer is spliced from by a task (None when it is
        done): paused while this socket is above its high-water mark. (A splice without a
        task is `active`, its source read from there.)"""
        self._unpause()
        self.source = source
        if source is not None and self.writable is not None:
            self.paused = source
            source.pause_reading()

    # the request cycle

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _next(self) -> None:
        """Start answering the next complete request in the buffer, if there is one."""
        buf = self.buf
        req = self.pending
        if req is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > HEAD_MAX or b"\n\n" in buf or b"\n\r\n" in buf:
                    self._hand_over()  # too long, or bare-LF framing: aiohttp decides
                return
            req = parse(bytes(buf[:end]))
            if req is None or req.length > self.front.max_body or self.front.closing:
                return self._hand_over()
            self.pending, self.head_end = req, end + 4
        size = self.head_end + req.length
        if len(buf) < size:
            return
        body = bytes(buf[self.head_end:size])
        schema, ability, path = req.route
        front = self.front
        node = front.node
        try:
            decoded = decode_request(body, schema, check=False)
        except InvalidRequest:
            return self._hand_over()
        if front.keys_required and not inference_allowed(node, req.authorization,
                                                         decoded.model):
            return self._hand_over()
        if front.mode == "internal" and not self._peer_ok():
            return self._hand_over()  # internal.peer_middleware answers 403 and closes
        hop = effective_hop(front.mode, req.hop)
        rid = request_id(req.request_id)
        key = request_key(decoded)
        # A request a peer serves is checked there (what it asks, whether the model serves
        # this route), and refused there exactly as here: only one node does the work.
        if hop is None and self._splice_now(req, rid, decoded.model, path, body, key):
            del buf[:size]
            self.pending = None
            return
        try:
            if ability not in node.abilities(decoded.model):
                return self._hand_over()
            if node.checks(decoded.model):
                decoded.check()  # type: ignore[attr-defined]
        except (InvalidRequest, NodeError):
            return self._hand_over()
        del buf[:size]
        self.pending = None
        call = Call(node, rid, front.peers, front.engines, hop=hop,
                    authorization=req.authorization if front.mode == "open" else None)
        # The task routes again, on purpose: a local replica's in-flight count rises only when
        # its relay starts, and concurrent requests must see each other there (bounded load).
        self.task = front.loop.create_task(
            self._answer(call, decoded.model, path, body, key, req.close))

    def _splice_now(self, req: Request, rid: str, name: str, path: str, body: bytes,
                    key: bytes) -> bool:
        """The common forward without a task: the first target is a peer with an idle pooled
        connection, so the request leaves before this returns and the answer is spliced in
        by that connection's callbacks (on_done). False (nothing done) for every
        other case, which the task path answers."""
        front = self.front
        peers = front.peers
        if peers is None or self.transport is None:
            return False
        node = front.node
        try:
            targets, cap, owner = node.route(name, key, path in PREFIX_PATHS)
        except (EngineError, NodeError):
            return False  # the task path answers the error
        first = targets[0]
        if first.local:
            return False
        more = len(targets) > 1
        data = encode_request("POST", first.url, path, body, forward_headers(
            rid, req.authorization if front.mode == "open" else None,
            cap if more else None, first.node_id != owner))
        close = req.close or front.closing
        handle = splice_now(peers, first.url, data, self.transport,
                            b"Connection: close\r\n" if close else b"", more,
                            tls_check(node, first), self)
        if handle is None:
            return False
        node.router.sent(name, first.node_id)
        self.active = handle
        self.forwarding = (req, rid, name, first, path, body, key, close)
        return True

    def on_done(self, done: Spliced) -> None:
        """The spliced answer is over (splice.Watcher): pass on how it ended, or try again."""
        handle, self.active = self.active, None
        req, rid, name, first, path, body, key, close = self.forwarding  # type: ignore[misc]
        self.forwarding = None
        self.front.node.router.answered(name, first.node_id)
        if self.paused is not None:
            self._unpause()
        handle.finish()  # type: ignore[union-attr]
        if self.gone:
            return
        if done.outcome in ("done", "broken"):
            if not (done.keep_alive and done.outcome == "done"):
                close = True
            if done.at_boundary:  # between two chunks: end the stream with an error event
                event = upstream_lost_event(first)
                self.transport.write(  # type: ignore[union-attr]
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            if done.outcome == "broken":
                log.info("forward.broken", node=first.name, request_id=rid)
            return self._done(close)
        # Nothing was written: the task path tries again (elsewhere unless it was stale).
        log.info("forward.retry", node=first.name, outcome=done.outcome, request_id=rid)
        if done.outcome == "unreachable":
            self.front.node.peers.reach.failed(first.node_id, first.name, first.url)
        exclude = None if done.outcome == "stale" else first.node_id
        front = self.front
        call = Call(front.node, rid, front.peers, front.engines, hop=None,
                    authorization=req.authorization if front.mode == "open" else None)
        self.task = front.loop.create_task(
            self._answer(call, name, path, body, key, req.close, exclude))

    async def _answer(self, call: Call, name: str, path: str, body: bytes, key: bytes,
                      close: bool, exclude: str | None = None) -> None:
        sink = _Sink(self, close or self.front.closing)
        try:
            await dispatch(call, name, path, body, key, sink, exclude)
        except (EngineError, NodeError) as exc:
            if not sink.started:
                status, headers, data = exception_parts(exc)
                await sink.respond(status, {**headers, "X-Request-Id": call.rid}, data)
            else:
                log.warning("request.broken", path=path, error=str(exc), request_id=call.rid)
                sink.close_after = True
        except Exception:
            log.exception("request.failed", path=path, request_id=call.rid)
            if not sink.started:
                status, headers, data = error_parts(
                    500, "internal error; the node's log has the details under this "
                         "request's id")
                await sink.respond(status, {**headers, "X-Request-Id": call.rid}, data)
            sink.close_after = True
        self.task = None
        self._done(sink.close_after)

    def _done(self, close: bool) -> None:
        """An answer is complete: close, or wait for (or start on) the next request."""
        if self.gone:
            return
        if close or self.front.closing:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        self.idle_since = self.front.loop.time()
        if self.buf:
            self._next()

    def _peer_ok(self) -> bool:
        """On the internal listener: is the TLS peer a live node of this cluster?"""
        security = self.front.node.security
        transport = self.transport
        if security is None or transport is None:
            return False
        try:
            security.check_peer(transport.get_extra_info("ssl_object"))
        except SecurityError:
            return False
        return True

    def _hand_over(self) -> None:
        """Give the connection, and the bytes not answered, to the aiohttp server."""
        transport, self.transport = self.transport, None
        self.front.conns.discard(self)
        if transport is None or transport.is_closing():
            return
        protocol = self.front.server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.reading_paused:
            transport.resume_reading()
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            protocol.data_received(data)


class _Sink:
    """Writes an answer to the client's socket (passthrough.Sink)."""

    __slots__ = ("close_after", "conn", "started")

    def __init__(self, conn: _Conn, close_after: bool) -> None:
        self.conn = conn
        self.close_after = close_after
        self.started = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    @property
    def extra_head(self) -> bytes:
        return b"Connection: close\r\n" if self.close_after else b""

    def on_source(self, source: asyncio.Transport | None) -> None:
        self.conn.on_source(source)

    def spliced(self, keep_alive: bool) -> None:
        self.started = True
        if not keep_alive:
            self.close_after = True

    def _write(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        transport.write(data)

    async def respond(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.started = True
        self._write(head(status, headers, b"Content-Length: %d\r\n" % len(body),
                          self.close_after) + body)

    async def open(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        self._write(head(status, headers, b"Transfer-Encoding: chunked\r\n",
                          self.close_after))

    async def write(self, data: bytes) -> None:
        if data:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))
            if self.conn.writable is not None:
                await self.conn.writable

    async def close(self) -> None:
        self._write(b"0\r\n\r\n")


class FrontSite(web.BaseSite):
    """A TCP site of an AppRunner whose connections start at the front (see the module
    docstring). Stopping it closes idle connections and gives busy ones the runner's
    shutdown_timeout to finish."""

    __slots__ = ("_front", "_host", "_port", "_reuse_address")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 reuse_address: bool = True) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_address = reuse_address
        self._front: _Front | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        front = self._front = _Front(runner.app, runner.server)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Conn(front), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._front is not None:
            await self._front.close(self._runner._shutdown_timeout)
        await super().stop()
