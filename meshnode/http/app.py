"""The node's aiohttp application and its lifecycle.

The app holds the node through one cleanup_ctx (entered on startup, closed on shutdown) and a
typed AppKey; there are no globals. `serve()` runs it until SIGINT/SIGTERM, then stops
accepting, gives in-flight requests `grace_s` to finish, cancels the rest and stops every
engine process.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from meshnode.node import Node, NodeConfig

from . import admin_api, forward, openai_api
from .errors import error_middleware
from .keys import NODE
from .middleware import request_id_middleware

__all__ = ["build_app", "serve"]

log = structlog.get_logger("meshnode.http")


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware, error_middleware],
                          client_max_size=node.config.max_body_bytes)
    app[NODE] = node

    async def node_ctx(app: web.Application) -> AsyncIterator[None]:
        async with app[NODE]:
            yield

    app.cleanup_ctx.append(node_ctx)
    app.cleanup_ctx.append(forward.session_ctx())
    app.add_routes(openai_api.routes)
    app.add_routes(admin_api.routes)
    return app


async def serve(config: NodeConfig, ready: asyncio.Event | None = None) -> None:
    node = Node(config)
    runner = web.AppRunner(build_app(node), handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.grace_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.http_port, reuse_address=True)
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
        print(f"meshnode: listening on http://{config.host}:{port}", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("node.stopping", grace_s=config.grace_s)
    finally:
        await runner.cleanup()
        log.info("node.stopped")
