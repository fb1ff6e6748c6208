"""Errors raised by the node package.

    NodeError                     root of every error this package raises
    ├── ConfigError               a setting or a state file is missing, malformed or unsafe
    │   └── KeyFileError          the API key file (keys.py) cannot be used
    ├── ModelNotFound             no catalogue entry, file or deployment of that name (HTTP 404)
    ├── InvalidDeployment         a launch/scale request that cannot be honoured (HTTP 400)
    ├── DeploymentExists          a deployment of that name already exists (HTTP 409)
    └── ModelUnavailable          the deployment exists but has no ready replica (HTTP 503)
        ├── ModelFailed           ... because its replica failed to start; `reason` says why
        └── ReplicaBusy           a forwarded request's target replica is at the forwarder's
                                  load cap (the forwarder tries another replica)

Engine errors (meshnode.engines.EngineError) pass through unchanged.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeploymentExists",
    "InvalidDeployment",
    "ModelFailed",
    "ModelNotFound",
    "ModelUnavailable",
    "NodeError",
    "ReplicaBusy",
]


class NodeError(Exception):
    """Root of the node package's errors."""


class ConfigError(NodeError):
    """A setting is missing, malformed or out of range."""


class ModelNotFound(NodeError):
    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message)
        self.param = param


class InvalidDeployment(NodeError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DeploymentExists(NodeError):
    pass


class ModelUnavailable(NodeError):
    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelFailed(ModelUnavailable):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, retry_after_s=30.0)
        self.reason = reason


class ReplicaBusy(ModelUnavailable):
    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=1.0)
