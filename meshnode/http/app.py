"""The node's aiohttp application and its lifecycle.

The app holds the node through one cleanup_ctx (entered on startup, closed on shutdown) and a
typed AppKey; there are no globals. `serve()` runs it until SIGINT/SIGTERM, then drains
(gossips that the node is stopping and keeps serving its replicas until they are ready on
other nodes, at most `drain_s` or until a second signal), stops accepting, gives in-flight
requests `grace_s` to finish, cancels the rest and stops every engine process.

The public port's connections start at the front (front.py): it serves inference requests
itself and hands every other connection to the app's aiohttp server.

A signed node (--ca/--cert) serves two listeners: the public API, which in a signed cluster
neither serves `/internal` routes nor honours the hop header (a client could otherwise skip
API keys and routing), and the node-to-node mTLS listener (internal.py) on `internal_port`.
`serve()` loads the cluster identity before binding anything, so a bad certificate, or an open
node bound off loopback without --insecure, stops the start with a ConfigError.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from meshnode.node import Node, NodeConfig, load_security

from . import admin_api, forward, invite_api, keys_api, openai_api
from .auth import auth_middleware
from .errors import error_middleware
from .front import FrontSite
from .internal import build_internal_app, is_internal
from .keys import NODE
from .middleware import request_id_middleware

__all__ = ["build_app", "serve"]

log = structlog.get_logger("meshnode.http")


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware, error_middleware, auth_middleware],
                          client_max_size=node.config.max_body_bytes)
    app[NODE] = node
    signed = node.security is not None
    app[forward.HOP_MODE] = "public" if signed else "open"

    async def node_ctx(app: web.Application) -> AsyncIterator[None]:
        async with app[NODE]:
            yield

    app.cleanup_ctx.append(node_ctx)
    app.cleanup_ctx.append(forward.upstream_ctx)
    app.cleanup_ctx.append(invite_api.invite_ctx)  # after node_ctx: needs the node's identity
    app.cleanup_ctx.append(forward.session_ctx(
        node.security.client_context() if node.security is not None else None))
    for table in _tables():
        app.add_routes([r for r in table if not (signed and is_internal(r))])
    return app


def _tables() -> tuple[web.RouteTableDef, ...]:
    """Every route table of the public app; their `/internal` routes move to the internal
    listener in a signed cluster."""
    return (openai_api.routes, admin_api.routes, keys_api.routes, invite_api.routes)


async def serve(config: NodeConfig, ready: asyncio.Event | None = None) -> None:
    security = await asyncio.to_thread(load_security, config.resolved())  # before any bind
    node = Node(config, security)
    internal: web.AppRunner | None = None
    internal_url = ""
    if security is not None:
        # Bound before the node starts, so its first gossip already names the port.
        internal = web.AppRunner(build_internal_app(node, _tables()), handler_cancellation=True,
                                 access_log=None, shutdown_timeout=config.grace_s)
        await internal.setup()
        try:
            await FrontSite(internal, config.host, config.internal_port, reuse_address=True,
                            ssl_context=security.server_context()).start()
        except BaseException:
            await internal.cleanup()
            raise
        node.internal_port = internal.addresses[0][1] if internal.addresses \
            else config.internal_port
        internal_url = f"https://{config.host}:{node.internal_port}"
    runner = web.AppRunner(build_app(node), handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.grace_s)
    stop, now = asyncio.Event(), asyncio.Event()  # the first signal, a second one
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: (now if stop.is_set() else stop).set())
    try:
        await runner.setup()
    except BaseException:
        if internal is not None:
            await internal.cleanup()
        raise
    try:
        site = FrontSite(runner, config.host, config.http_port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else config.http_port
        node.http_port = port
        if node.cluster is not None:
            node.cluster.refresh_meta()  # peers learn our real HTTP port now
        gossip = node.cluster.mesh.address if node.cluster is not None else ("", 0)
        log.info("node.listening", node=node.name, url=f"http://{config.host}:{port}",
                 gossip=f"{gossip[0]}:{gossip[1]}", data_dir=str(node.data_dir),
                 node_id=node.identity.node_id if node.identity else None)
        print(f"meshnode: gossip on {gossip[0]}:{gossip[1]}", flush=True)
        if internal_url:
            log.info("node.internal", url=internal_url, cluster=security.cluster_id
                     if security is not None else None)
            print(f"meshnode: node-to-node on {internal_url}", flush=True)
        print(f"meshnode: listening on http://{config.host}:{port}", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        if config.drain_s and (moving := node.start_drain()):
            print(f"meshnode: stopping: serving {', '.join(moving)} until ready on other nodes "
                  f"(at most {config.drain_s:g} s; signal again to stop now)", flush=True)
            if left := await node.drain(config.drain_s, now):
                print(f"meshnode: stopping with {', '.join(left)} not ready elsewhere yet",
                      flush=True)
        log.info("node.stopping", grace_s=config.grace_s)
    finally:
        if internal is not None:
            await internal.cleanup()
        await runner.cleanup()
        log.info("node.stopped")
