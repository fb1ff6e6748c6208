"""Serve a request where the router says: here (relay to the local engine) or on a peer.

A request is tried on the router's targets in order. A peer is sent the raw body on the same
path with `X-Meshnode-Hop: 1`; a request that carries the hop header is served here or
refused, never forwarded again, so a stale view cannot bounce a request around the mesh.
Before the first byte of an answer, a connection failure or a 503 from a peer moves on to the
next target (at most one try per ready replica); after it, bytes are passed through as they
come (streams chunk by chunk, no re-encoding), and a client that goes away cancels this
handler (handler_cancellation), which closes the upstream connection, which cancels the
peer's handler and its engine's generation.

One pooled keep-alive ClientSession per app, held through cleanup_ctx. Node-to-node TLS comes
with the security work: `session_ctx(ssl_context)` is the seam for the client side.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgspec
import structlog
from aiohttp import web

from meshnode.node import ModelUnavailable, Target

from .keys import NODE
from .middleware import REQUEST_ID
from .relay import relay

__all__ = ["FORWARD_SESSION", "HOP_HEADER", "dispatch", "session_ctx"]

log = structlog.get_logger("meshnode.http")

HOP_HEADER = "X-Meshnode-Hop"
FORWARD_SESSION = web.AppKey("forward_session", aiohttp.ClientSession)

_encode = msgspec.json.Encoder().encode
_CONNECT_FAILED = (aiohttp.ClientConnectionError, OSError, TimeoutError)
_PASS_HEADERS = ("X-Served-By", "Retry-After", "Cache-Control")


def session_ctx(ssl_context: ssl.SSLContext | None = None
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx that opens the app's forwarding session and closes it on shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=30.0,
            ssl=ssl_context if ssl_context is not None else False)
        # No total timeout: a stream may run for minutes. Connecting to a dead peer fails fast.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         auto_decompress=False) as session:
            app[FORWARD_SESSION] = session
            yield

    return ctx


async def dispatch(request: web.Request, name: str, path: str, body: bytes,
                   key: bytes) -> web.StreamResponse:
    """Answer `request` (already decoded: deployment `name`, routing `key`) from a replica."""
    node = request.app[NODE]
    if request.headers.get(HOP_HEADER):
        return await relay(request, node.replica(name), path, body, node.name)
    targets = node.route(name, key)
    last: ModelUnavailable | None = None
    for i, target in enumerate(targets):
        final = i == len(targets) - 1
        if target.local:
            replica = node.replicas.get(name)
            if (replica is None or replica.state != "ready") and not final:
                continue  # it went away since the route was computed: try the next one
            return await relay(request, node.replica(name), path, body, node.name)
        response = await _forward(request, target, path, body, final)
        if response is not None:
            return response
        last = ModelUnavailable(f"model {name!r}: no replica answered; retry shortly")
    raise last or ModelUnavailable(f"model {name!r} has no ready replica; retry shortly")


async def _forward(request: web.Request, target: Target, path: str, body: bytes,
                   final: bool) -> web.StreamResponse | None:
    """The peer's answer passed through, or None to try the next target (it failed before
    its first byte: unreachable, or 503 when others remain)."""
    session = request.app[FORWARD_SESSION]
    router = request.app[NODE].router
    rid = request[REQUEST_ID]
    headers = {HOP_HEADER: "1", "X-Request-Id": rid, "Content-Type": "application/json"}
    with router.track(target.node_id):
        try:
            upstream = await session.post(target.url + path, data=body, headers=headers)
        except _CONNECT_FAILED as exc:
            log.info("forward.failed", node=target.name, error=repr(exc))
            return None
        async with upstream:
            try:
                if upstream.status == 503 and not final:
                    log.info("forward.unavailable", node=target.name)
                    return None
                got = upstream.headers
                out = {"X-Request-Id": rid, **{h: got[h] for h in _PASS_HEADERS if h in got}}
                if upstream.content_type != "text/event-stream":
                    try:
                        data = await upstream.read()
                    except _CONNECT_FAILED as exc:
                        log.info("forward.failed", node=target.name, error=repr(exc))
                        return None
                    return web.Response(status=upstream.status, body=data, headers=out,
                                        content_type=upstream.content_type)
                response = web.StreamResponse(status=upstream.status, headers={
                    **out, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                except (aiohttp.ClientPayloadError, *_CONNECT_FAILED):
                    await response.write(b"data: " + _encode({"error": {
                        "message": f"node {target.name} went away while streaming; retry the "
                                   "request", "type": "server_error", "param": None,
                        "code": "upstream_lost"}}) + b"\n\n")
                await response.write_eof()
                return response
            except BaseException:
                upstream.close()  # not back to the pool: the peer must see us go away
                raise
