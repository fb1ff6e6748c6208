"""The aiohttp side of serving an inference request (passthrough.py does the work).

The app holds two pools of keep-alive connections (the lean client of upstream.py: these hops
are on every request's path), opened and closed through cleanup_ctx: one to peer nodes
(`session_ctx(ssl)`, with the node's mTLS client context in a signed cluster) and one to this
node's engine processes (`upstream_ctx`).

Who may ask to be served here (`HOP_MODE`, an app setting):
- "open" (an open cluster's public app): the hop header marks a forwarded request, served here;
- "public" (a signed cluster's public app): the hop header is ignored, so a client cannot skip
  routing; peers forward to the internal listener instead;
- "internal" (a signed cluster's mTLS listener, internal.py): every request was forwarded by an
  authenticated peer and is served here.
In an open cluster that requires API keys, the client's Authorization header goes along to
the peer, which checks it again.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from .keys import NODE
from .middleware import REQUEST_ID
from .passthrough import HOP_HEADER, Call, dispatch, effective_hop
from .upstream import Upstream

__all__ = ["ENGINE_UPSTREAM", "FORWARD_UPSTREAM", "HOP_HEADER", "HOP_MODE", "answer", "call_for",
           "session_ctx", "upstream_ctx"]

log = structlog.get_logger("meshnode.http")

FORWARD_UPSTREAM = web.AppKey("forward_upstream", Upstream)
ENGINE_UPSTREAM = web.AppKey("engine_upstream", Upstream)
HOP_MODE = web.AppKey("hop_mode", str)
""""open" (default), "public" or "internal": see the module docstring."""


def session_ctx(ssl_context: ssl.SSLContext | None = None
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx that opens the app's forwarding pool and closes it on shutdown.
    Connecting to a dead peer fails after 5 s; an answer may stream for minutes, so no timeout
    bounds it: when membership declares the peer dead, its connections are dropped, and when
    the peer is likely not answering (unreachable from here, or suspected for a while), the
    requests that have no answer yet move on and answers that stall are cut off."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with Upstream(ssl_context=ssl_context, connect_timeout_s=5.0) as pool:
            app[FORWARD_UPSTREAM] = pool
            peers = app[NODE].peers
            undo = peers.on_gone(pool.drop)  # a dead peer's requests fail over
            undo_stuck = peers.on_stuck(_moving(pool))  # as do unanswered ones
            try:
                yield
            finally:
                undo()
                undo_stuck()

    return ctx


def _moving(pool: Upstream) -> Callable[[str, str], None]:
    """An on_stuck hook: abort the requests waiting on a peer that is likely not to answer
    and have no answer yet, which then go to their next replica (answers that stall are cut
    off a little later: Upstream.drop_unanswered)."""

    def hook(url: str, why: str) -> None:
        if moved := pool.drop_unanswered(url, why):
            log.info("forward.moved", url=url, requests=moved, why=why)

    return hook


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the app's pool of connections to its engines, closed on shutdown."""
    async with Upstream() as pool:
        app[ENGINE_UPSTREAM] = pool
        yield


def call_for(app: web.Application, rid: str, hop: str | None,
             authorization: str | None) -> Call:
    """The Call of a request that came in on `app` with these header values."""
    mode = app.get(HOP_MODE, "open")
    return Call(app[NODE], rid, app.get(FORWARD_UPSTREAM), app[ENGINE_UPSTREAM],
                hop=effective_hop(mode, hop),
                authorization=authorization if mode == "open" else None)


class _ResponseSink:
    """A Sink that builds the aiohttp response."""

    transport = None  # aiohttp frames the body itself: nothing is spliced
    extra_head = b""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    def on_source(self, source: object) -> None:
        raise AssertionError("an aiohttp response is never spliced")

    def spliced(self, keep_alive: bool) -> None:
        raise AssertionError("an aiohttp response is never spliced")

    async def respond(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.response = web.Response(status=status, body=body, headers=headers)

    async def open(self, status: int, headers: dict[str, str]) -> None:
        self.response = web.StreamResponse(status=status, headers=headers)
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def close(self) -> None:
        assert self.response is not None
        await self.response.write_eof()


async def answer(request: web.Request, name: str, path: str, body: bytes,
                 key: bytes) -> web.StreamResponse:
    """Answer `request` (already decoded: deployment `name`, routing `key`) from a replica."""
    call = call_for(request.app, request[REQUEST_ID], request.headers.get(HOP_HEADER),
                    request.headers.get("Authorization"))
    sink = _ResponseSink(request)
    await dispatch(call, name, path, body, key, sink)
    assert sink.response is not None
    return sink.response
