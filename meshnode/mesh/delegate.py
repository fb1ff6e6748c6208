"""The narrow edge between the mesh and the node that runs it (memberlist's Delegate).

The core calls these methods synchronously from its protocol path, so they must return at once:
no I/O, no locks held for long, no awaiting. Events go the other way as return values of the
core (``Output.events``), not as callbacks.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Delegate", "StaticDelegate"]


class Delegate(Protocol):
    def node_meta(self) -> bytes:
        """Metadata of this node (at most MeshConfig.meta_max_bytes), gossiped in alive
        messages. Read at start and by ``update_meta()``; a change costs an incarnation."""
        ...

    def local_load(self) -> bytes:
        """Current load of this node (at most MeshConfig.load_max_bytes), read for every ack
        and push-pull; changes often and never raises the incarnation."""
        ...


class StaticDelegate:
    """A delegate whose answers are plain attributes (the default; handy in tests)."""

    def __init__(self, meta: bytes = b"", load: bytes = b"") -> None:
        self.meta = meta
        self.load = load

    def node_meta(self) -> bytes:
        return self.meta

    def local_load(self) -> bytes:
        return self.load
