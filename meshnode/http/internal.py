"""The node-to-node listener of a signed cluster: mTLS on `internal_port`.

It serves what only peers may ask for: forwarded inference requests (served here, never
forwarded again) and every `/internal/...` route (table pulls: deployments, API keys, the
revocation list). The TLS context requires a client certificate chained to the cluster CA; then
`peer_middleware` checks, on every request, the peer certificate's node and cluster id, expiry
and revocation (security.ClusterSecurity.check_peer, cached per certificate), and answers 403
and closes the connection otherwise. No API key applies here: mTLS alone authenticates.

In an open cluster there is no such listener: the `/internal` routes stay on the public app.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from aiohttp import web

from meshnode.mesh.crypto_errors import SecurityError
from meshnode.node import INTERNAL_REVOCATION_PATH, Node

from . import forward, openai_api
from .errors import Handler, error_middleware, error_response
from .keys import NODE
from .middleware import request_id_middleware

__all__ = ["INTERNAL_PREFIX", "build_internal_app", "is_internal", "routes"]

log = structlog.get_logger("meshnode.http")

INTERNAL_PREFIX = "/internal/"
routes = web.RouteTableDef()


def is_internal(route: web.AbstractRouteDef) -> bool:
    """A node-to-node route (served only by the internal listener of a signed cluster)."""
    return getattr(route, "path", "").startswith(INTERNAL_PREFIX)


@routes.get(INTERNAL_REVOCATION_PATH)
async def revocation(request: web.Request) -> web.Response:
    """The revocation list this node holds (RevocationList bytes; empty if none)."""
    return web.Response(body=request.app[NODE].revocation_bytes(),
                        content_type="application/octet-stream")


@web.middleware
async def peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    try:
        if node.security is None:
            raise SecurityError("this node has no cluster identity")
        node.security.check_peer(ssl_object)
    except SecurityError as exc:
        log.info("internal.peer_refused", error=str(exc))
        response = error_response(403, f"node-to-node listener: peer refused: {exc}")
        response.force_close()
        return response
    return await handler(request)


def build_internal_app(node: Node, tables: Iterable[web.RouteTableDef]) -> web.Application:
    """The internal app: forwarded OpenAI routes, the revocation list, and the `/internal`
    routes of `tables` (the public route tables, which then leave them out)."""
    app = web.Application(middlewares=[peer_middleware, request_id_middleware,
                                       error_middleware],
                          client_max_size=node.config.max_body_bytes)
    app[NODE] = node
    app[forward.HOP_MODE] = "internal"
    app.cleanup_ctx.append(forward.upstream_ctx)  # the node itself is entered by the public app
    app.add_routes(openai_api.routes)
    app.add_routes(routes)
    for table in tables:
        app.add_routes([r for r in table if is_internal(r)])
    return app
