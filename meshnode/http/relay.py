"""Pass a request to an engine's OpenAI server and its answer back, chunk by chunk.

Streamed bytes are not re-encoded: each chunk the engine writes is written to the client as
it arrives, and the client's TCP backpressure reaches the engine through the socket. A client
that goes away cancels this handler (handler_cancellation), which closes the upstream
connection, which cancels generation in the engine.

The hop goes through the app's lean `Upstream` pool (upstream.py), not aiohttp's client: it is
on every request's path, and the pool costs about half the CPU per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from meshnode.node import Replica

from .middleware import REQUEST_ID
from .upstream import Upstream, UpstreamError

__all__ = ["ENGINE_UPSTREAM", "relay", "upstream_ctx"]

ENGINE_UPSTREAM = web.AppKey("engine_upstream", Upstream)

_encode = msgspec.json.Encoder().encode
_CRASHED = b"data: " + _encode({"error": {
    "message": "the engine stopped while streaming; retry the request",
    "type": "server_error", "param": None, "code": "engine_crashed"}}) + b"\n\n"
_UPSTREAM_DOWN = (UpstreamError, OSError)


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the app's pool of connections to its engines, closed on shutdown."""
    async with Upstream() as pool:
        app[ENGINE_UPSTREAM] = pool
        yield


async def relay(request: web.Request, replica: Replica, path: str, body: bytes,
                served_by: str) -> web.StreamResponse:
    address = replica.address()
    rid = request[REQUEST_ID]
    headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
    out_headers = {"X-Request-Id": rid, "X-Served-By": served_by}
    replica.in_flight += 1
    try:
        try:
            upstream = await request.app[ENGINE_UPSTREAM].request(
                "POST", address, path, body, headers)
        except _UPSTREAM_DOWN as exc:
            raise replica.process.crashed() if replica.process else exc from exc
        async with upstream:
            if upstream.content_type != "text/event-stream":
                try:
                    data = await upstream.read()
                except _UPSTREAM_DOWN as exc:
                    raise replica.process.crashed() if replica.process else exc from exc
                if "retry-after" in upstream.headers:
                    out_headers["Retry-After"] = upstream.headers["retry-after"]
                out_headers["Content-Type"] = upstream.headers.get(
                    "content-type", "application/json")
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers={
                **out_headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            tail = b""
            try:
                async for chunk in upstream.iter_chunks():
                    await response.write(chunk)
                    tail = (tail + chunk)[-512:]
            except _UPSTREAM_DOWN:
                pass
            # A stream ends with [DONE] or an error event; an engine that died between two
            # chunks may look like a clean end of body, so check what the last event was.
            last = tail.rstrip(b"\n").rpartition(b"\n\n")[2]
            if last != b"data: [DONE]" and not last.startswith(b'data: {"error"'):
                await response.write(_CRASHED)
            await response.write_eof()
            return response
    finally:
        replica.in_flight -= 1
