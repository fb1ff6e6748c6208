"""The one place that renders errors as OpenAI error bodies.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Maps the engines' and the node's error trees and aiohttp's HTTP exceptions to a status:
400 invalid request, 404 unknown model or route, 405, 409 exists, 413 body too large,
503 loading/unavailable (with Retry-After), 502 engine crashed, 500 anything else.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from meshnode.engines import (
    EngineCrashed,
    EngineError,
    EngineFailed,
    EngineUnavailable,
    EngineUnsupported,
    InvalidRequest,
)
from meshnode.node import (
    ConfigError,
    DeploymentExists,
    InvalidDeployment,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    NodeError,
    ReplicaBusy,
)

__all__ = ["error_middleware", "error_parts", "error_response", "exception_parts"]

log = structlog.get_logger("meshnode.http")
_encode = msgspec.json.Encoder().encode

_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error"}


def error_parts(status: int, message: str, *, param: str | None = None,
                code: str | None = None, retry_after_s: float | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of an error answer, for any server (aiohttp or the front)."""
    type_ = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if status == 503:
        type_ = "service_unavailable"
    headers = {"Content-Type": "application/json"}
    if retry_after_s:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    body = _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})
    return status, headers, body


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None, retry_after_s: float | None = None) -> web.Response:
    status, headers, body = error_parts(status, message, param=param, code=code,
                                        retry_after_s=retry_after_s)
    return web.Response(status=status, body=body, headers=headers)


def exception_parts(exc: Exception) -> tuple[int, dict[str, str], bytes]:
    """The error answer for one of the engines' or the node's errors; re-raises any other."""
    match exc:
        case InvalidRequest():
            return error_parts(400, str(exc), param=exc.param, code=exc.code)
        case ModelNotFound():
            return error_parts(404, str(exc), param=exc.param, code="model_not_found")
        case InvalidDeployment():
            return error_parts(400, str(exc), param=exc.param)
        case DeploymentExists():
            return error_parts(409, str(exc), param="name", code="deployment_exists")
        case ReplicaBusy():
            return error_parts(503, str(exc), code="replica_busy",
                               retry_after_s=exc.retry_after_s)
        case ModelFailed():
            return error_parts(503, str(exc), code="model_failed",
                               retry_after_s=exc.retry_after_s)
        case ModelUnavailable() | EngineUnavailable():
            return error_parts(503, str(exc), code="model_loading",
                               retry_after_s=exc.retry_after_s)
        case EngineFailed():
            return error_parts(503, f"{exc}: {exc.reason}", code="model_failed",
                               retry_after_s=30)
        case EngineUnsupported():
            return error_parts(400, str(exc), param="engine", code="engine_unsupported")
        case EngineCrashed():
            return error_parts(502, str(exc), code="engine_crashed")
        case ConfigError():
            return error_parts(400, str(exc))
    raise exc


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (EngineError, NodeError) as exc:
        status, headers, body = exception_parts(exc)
        return web.Response(status=status, body=body, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") \
            else exc.reason
        if exc.status == 413:
            message = f"request body too large: {exc.text}"
        elif exc.status == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = error_response(exc.status, message)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        log.exception("request.failed", path=request.path)
        return error_response(500, "internal error; the node's log has the details "
                              "under this request's id")
