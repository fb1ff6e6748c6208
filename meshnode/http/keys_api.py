"""API key routes: create (the key is in this one answer only), list, revoke (admin role, which
auth.py enforces); and the node-to-node key table that peers pull (hashes, never keys)."""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from meshnode.engines import decode_request
from meshnode.node import INTERNAL_KEYS_PATH, CreateKeyRequest

from .keys import NODE

__all__ = ["routes"]

routes = web.RouteTableDef()


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status,
                        content_type="application/json")


@routes.post("/v1/keys")
async def create_key(request: web.Request) -> web.Response:
    req = decode_request(await request.read(), CreateKeyRequest)
    key, entry = request.app[NODE].api_keys.create(req)
    return _json({**entry.public(time.time()), "key": key}, status=201)


@routes.get("/v1/keys")
async def list_keys(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[NODE].api_keys.views()})


@routes.delete("/v1/keys/{id}")
async def revoke_key(request: web.Request) -> web.Response:
    entry = request.app[NODE].api_keys.revoke(request.match_info["id"])
    return _json(entry.public(time.time()))


@routes.get(INTERNAL_KEYS_PATH)
async def internal_keys(request: web.Request) -> web.Response:
    """Node to node: every key entry (SHA-256 of secrets, revoked ones too), for sync."""
    return web.Response(body=request.app[NODE].api_keys.entries(),
                        content_type="application/json")
