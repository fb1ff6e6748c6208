"""Serve a request where the router says: here (relay to the local engine) or on a peer.

A request is tried on the router's targets in order. A peer is sent the raw body on the same
path with `X-Meshnode-Hop: 1`; a request that carries the hop header is served here or
refused, never forwarded again, so a stale view cannot bounce a request around the mesh.
Before the first byte of an answer, a connection failure or a 503 from a peer moves on to the
next target (at most one try per ready replica); after it, bytes are passed through as they
come (streams chunk by chunk, no re-encoding), and a client that goes away cancels this
handler (handler_cancellation), which closes the upstream connection, which cancels the
peer's handler and its engine's generation.

One pool of keep-alive connections per app (the lean client of upstream.py: this hop is on
every forwarded request's path), held through cleanup_ctx; `session_ctx(ssl)` gives it the
node's mTLS client context in a signed cluster. In an open cluster that requires API keys,
the client's Authorization header goes along, since the peer checks it again.

Who may ask to be served here (`HOP_MODE`, an app setting):
- "open" (an open cluster's public app): the hop header marks a forwarded request, as above;
- "public" (a signed cluster's public app): the hop header is ignored, so a client cannot skip
  routing; peers forward to the internal listener instead;
- "internal" (a signed cluster's mTLS listener, internal.py): every request was forwarded by an
  authenticated peer and is served here. Before passing a peer's answer on, the forwarder checks
  that the certificate that answered is the target node's.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import msgspec
import structlog
from aiohttp import web

from meshnode.node import ModelUnavailable, Target

from .keys import NODE
from .middleware import REQUEST_ID
from .relay import relay
from .upstream import Upstream, UpstreamError, UpstreamResponse

__all__ = ["FORWARD_UPSTREAM", "HOP_HEADER", "HOP_MODE", "dispatch", "session_ctx"]

log = structlog.get_logger("meshnode.http")

HOP_HEADER = "X-Meshnode-Hop"
FORWARD_UPSTREAM = web.AppKey("forward_upstream", Upstream)
HOP_MODE = web.AppKey("hop_mode", str)
""""open" (default), "public" or "internal": see the module docstring."""

_encode = msgspec.json.Encoder().encode
_PASS_HEADERS = (("x-served-by", "X-Served-By"), ("retry-after", "Retry-After"),
                 ("cache-control", "Cache-Control"))


def session_ctx(ssl_context: ssl.SSLContext | None = None
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx that opens the app's forwarding pool and closes it on shutdown.
    Connecting to a dead peer fails after 5 s; an answer may stream for minutes."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with Upstream(ssl_context=ssl_context, connect_timeout_s=5.0) as pool:
            app[FORWARD_UPSTREAM] = pool
            yield

    return ctx


async def dispatch(request: web.Request, name: str, path: str, body: bytes,
                   key: bytes) -> web.StreamResponse:
    """Answer `request` (already decoded: deployment `name`, routing `key`) from a replica."""
    node = request.app[NODE]
    mode = request.app.get(HOP_MODE, "open")
    if mode == "internal" or (mode == "open" and request.headers.get(HOP_HEADER)):
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


def _peer_ok(request: web.Request, upstream: UpstreamResponse, target: Target) -> bool:
    """In a signed cluster: did the target node's own, unrevoked certificate answer?"""
    node = request.app[NODE]
    if node.security is None:
        return True
    try:
        node.verify_peer_tls(upstream.ssl_object, target.node_id)
    except Exception as exc:  # noqa: BLE001 - the security layer's errors: refuse the peer
        log.warning("forward.peer_refused", node=target.name, error=str(exc))
        return False
    return True


async def _forward(request: web.Request, target: Target, path: str, body: bytes,
                   final: bool) -> web.StreamResponse | None:
    """The peer's answer passed through, or None to try the next target (it failed before
    its first byte: unreachable, or 503 when others remain)."""
    pool = request.app[FORWARD_UPSTREAM]
    router = request.app[NODE].router
    rid = request[REQUEST_ID]
    headers = {HOP_HEADER: "1", "X-Request-Id": rid, "Content-Type": "application/json"}
    auth = request.headers.get("Authorization")
    if auth is not None and request.app.get(HOP_MODE, "open") == "open":
        headers["Authorization"] = auth
    with router.track(target.node_id):
        try:
            upstream = await pool.request("POST", target.url, path, body, headers)
        except UpstreamError as exc:
            log.info("forward.failed", node=target.name, error=str(exc))
            return None
        try:
            if not _peer_ok(request, upstream, target):
                upstream.close()
                return None
            if upstream.status == 503 and not final:
                log.info("forward.unavailable", node=target.name)
                upstream.close()
                return None
            got = upstream.headers
            out = {"X-Request-Id": rid, **{name: got[h] for h, name in _PASS_HEADERS
                                           if h in got}}
            if upstream.content_type != "text/event-stream":
                try:
                    data = await upstream.read()
                except UpstreamError as exc:
                    log.info("forward.failed", node=target.name, error=str(exc))
                    upstream.close()
                    return None
                out["Content-Type"] = got.get("content-type", "application/json")
                upstream.release()
                return web.Response(status=upstream.status, body=data, headers=out)
            response = web.StreamResponse(status=upstream.status, headers={
                **out, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                async for chunk in upstream.iter_chunks():
                    await response.write(chunk)
            except UpstreamError:
                await response.write(b"data: " + _encode({"error": {
                    "message": f"node {target.name} went away while streaming; retry the "
                               "request", "type": "server_error", "param": None,
                    "code": "upstream_lost"}}) + b"\n\n")
            await response.write_eof()
            upstream.release()
            return response
        finally:
            upstream.close()  # unless released above: the peer must see us go away
