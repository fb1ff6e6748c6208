"""Errors raised by meshnode.mesh.

Every error the package raises derives from one root, so callers can catch ``MeshError``::

    MeshError
    ├── ConfigError        a MeshConfig (or a Mesh argument) holds an invalid value
    ├── DecodeError        a datagram or stream frame was rejected; ``reason`` says why:
    │                        "oversized", "malformed", "version", "cluster", "frame"
    ├── JoinError          no seed answered a join push-pull
    └── MeshStateError     an operation was called in the wrong lifecycle state
                           (e.g. ``join()`` before ``start()`` or after ``close()``)

The protocol core (``Swim``) never lets a ``DecodeError`` escape: it counts the packet in
``Swim.stats`` under ``drop.<reason>`` and drops it. The codec functions of ``wire`` raise it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DecodeError", "JoinError", "MeshError", "MeshStateError"]


class MeshError(Exception):
    """Root of every error raised by meshnode.mesh."""


class ConfigError(MeshError, ValueError):
    """A configuration value is out of its valid range."""


class DecodeError(MeshError):
    """Bytes from the network could not be accepted.

    ``reason`` is a short stable word used as a stats key: "oversized" (over the size cap),
    "malformed" (not a valid message), "version" (protocol version outside what we speak),
    "cluster" (packet of another cluster), "frame" (bad TCP frame header).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class JoinError(MeshError):
    """No seed could be reached for the join push-pull."""


class MeshStateError(MeshError):
    """The Mesh is not in a state that allows this operation."""
