"""Routing: which ready replica serves a request. Every node makes the same choice.

    key(chat)        = model \\0 first 256 bytes of (system prompt \\0 first user message)
    key(completion)  = model \\0 first 256 bytes of the prompt (embeddings: of the input)
    ring             = Ring(ready node ids), cached per (deployment, ready set)
    first            = ring.choose(key, loads, c=1.25)
    order            = [first] + the rest of ring.walk(key): the retry order

Requests that share a prefix reach the same replica (its KV/prefix cache is warm) unless that
replica is above 1.25x the mean load, then they spill to the next one on the ring. The key is
the prompt's first 256 bytes, chat or not: requests under one long system prompt (an app's
instructions, the expensive shared prefix) go together, while under a short one ("Be brief.")
the first user message makes each conversation its own key, so its later turns, which extend
the same prefix, return to the replica that holds it.

Loads: a node's gossiped in-flight count, or this node's own count of requests it has
forwarded there and not yet seen answered, whichever is larger. The gossiped count already
includes ours once it has caught up, so adding the two would count ours twice; the larger one
is right when gossip is fresh and still counts our own when it is stale.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping

import msgspec

from meshnode.engines import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
)
from meshnode.mesh.hashing import DEFAULT_LOAD_FACTOR, Ring

__all__ = ["PREFIX_BYTES", "Router", "request_key"]

PREFIX_BYTES = 256
"""Bytes of a completion prompt (or embedding input) that form its routing key."""

_RING_CACHE = 256
"""Rings kept (one per deployment and ready set); a new set builds one in ~0.2 ms per node."""

_json = msgspec.json.Encoder().encode


def _text(content: object) -> bytes:
    if content is None:
        return b""
    if isinstance(content, str):
        return content.encode("utf-8", "surrogatepass")
    return _json(content)


def request_key(req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest
                | RerankRequest) -> bytes:
    """The routing key of a decoded request: a stable function of its prompt's prefix."""
    model = req.model.encode()
    match req:
        case ChatCompletionRequest():
            system = next((m.content for m in req.messages
                           if m.role in ("system", "developer")), None)
            user = next((m.content for m in req.messages if m.role == "user"), None)
            return model + b"\0" + (_text(system) + b"\0" + _text(user))[:PREFIX_BYTES]
        case CompletionRequest():
            return model + b"\0" + _text(req.prompt)[:PREFIX_BYTES]
        case EmbeddingRequest():
            return model + b"\0" + _text(req.input)[:PREFIX_BYTES]
        case RerankRequest():
            return model + b"\0" + _text(req.query)[:PREFIX_BYTES]
    raise TypeError(f"no routing key for {type(req).__name__}")


class Router:
    """Chooses among ready replicas; counts the requests this node has forwarded."""

    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR) -> None:
        self.load_factor = load_factor
        self.forwarded: Counter[str] = Counter()
        """Node id -> requests this node has sent there and not yet seen answered."""
        self._rings: dict[tuple[str, frozenset[str]], Ring] = {}

    def ring(self, name: str, nodes: frozenset[str]) -> Ring:
        key = (name, nodes)
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= _RING_CACHE:
                self._rings.clear()
            ring = self._rings[key] = Ring(nodes)
        return ring

    def order(self, name: str, key: bytes, gossiped: Mapping[str, int]) -> list[str]:
        """Ready node ids (the keys of `gossiped`, their gossiped loads) in the order to try:
        the bounded-load choice first, then the ring walk from the key. [] when none."""
        if not gossiped:
            return []
        ring = self.ring(name, frozenset(gossiped))
        forwarded = self.forwarded.get
        loads = {n: max(load, forwarded(n, 0)) for n, load in gossiped.items()}
        order = ring.order(key)
        first = ring.choose_in(order, loads, self.load_factor)
        return [first, *(n for n in order if n != first)]

    @contextlib.contextmanager
    def track(self, node_id: str) -> Iterator[None]:
        """Count a request forwarded to `node_id` while it runs."""
        self.forwarded[node_id] += 1
        try:
            yield
        finally:
            self.forwarded[node_id] -= 1
            if self.forwarded[node_id] <= 0:
                del self.forwarded[node_id]
