"""Request ids: every request gets one, in the logs and in the X-Request-Id header."""

from __future__ import annotations

import itertools
import os
import re

import structlog
from aiohttp import web

from .errors import Handler

__all__ = ["REQUEST_ID", "request_id", "request_id_middleware"]

REQUEST_ID = "meshnode.request_id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")


_PREFIX = os.urandom(6).hex()
_counter = itertools.count(1)


def request_id(given: str) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one: this process's
    random prefix and a counter (unique per node run, and no syscall per request)."""
    if given and _VALID.fullmatch(given):
        return given
    return f"{_PREFIX}{next(_counter):08x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request.headers.get("X-Request-Id", ""))
    request[REQUEST_ID] = rid
    with structlog.contextvars.bound_contextvars(request_id=rid):
        response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
    return response
