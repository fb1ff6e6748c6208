"""Request ids: every request gets one, in the logs and in the X-Request-Id header."""

from __future__ import annotations

import os
import re

import structlog
from aiohttp import web

from .errors import Handler

__all__ = ["REQUEST_ID", "request_id_middleware"]

REQUEST_ID = "meshnode.request_id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    rid = given if _VALID.fullmatch(given) else os.urandom(12).hex()
    request[REQUEST_ID] = rid
    with structlog.contextvars.bound_contextvars(request_id=rid):
        response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
    return response
