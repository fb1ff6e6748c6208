"""Errors raised by the engines package.

    EngineError                   root of every error this package raises
    ├── InvalidRequest            the request cannot be served as sent (HTTP 400); has `param`
    │   └── ContextOverflow       prompt + max_tokens exceed the model's context window
    ├── EngineUnsupported         no engine on this node can run the model (or the forced one)
    ├── EngineUnavailable         the engine process is not ready (loading, restarting, stopped)
    ├── EngineFailed              the engine process could not start; `reason` says why
    └── EngineCrashed             the engine process died while serving a request

Third-party exceptions (llama.cpp, aiohttp client errors on the engine socket) are translated
into these at the adapter's edge; only `meshnode.http` renders them as OpenAI error bodies.
"""

from __future__ import annotations

__all__ = [
    "ContextOverflow",
    "EngineCrashed",
    "EngineError",
    "EngineFailed",
    "EngineUnavailable",
    "EngineUnsupported",
    "InvalidRequest",
]


class EngineError(Exception):
    """Root of the engines package's errors."""


class InvalidRequest(EngineError):
    """The request is well-formed JSON but cannot be served as sent."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextOverflow(InvalidRequest):
    """Prompt tokens plus requested completion tokens exceed the context window."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineUnsupported(EngineError):
    """No engine on this node can run the model, or the forced one cannot; says why."""


class EngineUnavailable(EngineError):
    """The engine is not ready to take requests; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineFailed(EngineError):
    """The engine could not be started; `reason` is what its process said last."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class EngineCrashed(EngineError):
    """The engine process died or dropped the connection while serving a request."""
