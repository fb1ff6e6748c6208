"""Routing: which ready replica serves a request. Every node makes the same choice.

    key(chat)        = model \\0 first 256 bytes of (system prompt \\0 first user message)
                       [\\0 key \\0 prompt_cache_key, when the request gives one]
    key(completion)  = model \\0 first 256 bytes of the prompt (embeddings: of the input)
    ring             = Ring(ready node ids), cached per (deployment, ready set)

Generative requests (chat, completions) go where their prefix is assigned (prefixes.py): the
ready replicas gossip which prefixes they served, every node computes the same balanced,
sticky assignment of prefixes to replicas from that, and a new prefix goes where the ring
puts it::

    pid    = prefix_id(key)
    owner  = assignment.owner[pid], or for a new prefix the first of ring.order(pid)
    order  = [owner] + the other replicas advertising pid + the rest, each in ring.order(pid)
    cap    = max(ceil(1.25 * (total in flight + 1) / R), MIN_CAPACITY)
    first  = the first of `order` this node knows to be under `cap`

Embeddings and rerank have no prefix to reuse: `order` is the ring walk from the key. Either
way the rest of the walk is the retry order.

Requests that share a prefix reach the same replica (its KV/prefix cache is warm) unless that
replica is above 1.25x the mean load, then they spill to another replica that has served the
prefix, then along the ring. The key is the prompt's first 256 bytes, chat or not: requests
under one long system prompt (an app's instructions, the expensive shared prefix) go together,
while under a short one ("Be brief.") the first user message makes each conversation its own
key, so its later turns, which extend the same prefix, return to the replica that holds it.

Loads are per deployment (the bound compares a deployment's replicas, whatever else their
nodes serve). Only a replica knows its own in-flight count; others see it gossiped, a
snapshot up to a probe round old, which still counts requests that have finished: judged by
it, a chat's next turn spilled off its replica to a cold one (bench/prefix_affinity). So the
bound is checked where the count is exact:

- the entering node sizes `cap` from the total in flight, each replica counted by the larger
  of its gossiped count and this node's own requests forwarded there and not yet answered
  (the gossiped count includes ours once it has caught up, so adding them would count ours
  twice);
- it skips a replica only when it knows that replica is full: its own forwarded requests
  (or, for a local replica, the exact count) already reach `cap`;
- every try but the last carries `cap`, and the target answers 503 `replica_busy` before any
  byte when its replica already holds `cap` requests; the forwarder then tries the next one.
  The last try carries none, so a request is always served.
- a try sent to another replica than the owner is marked a spill (`; spill`): it warms that
  replica's cache but claims nothing, even where the owner's ledger has not arrived yet
  (within a second of a new prefix), so a spill never takes a prefix from its owner.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple

import msgspec

from meshnode.engines import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
)
from meshnode.mesh.hashing import DEFAULT_LOAD_FACTOR, Ring, bounded_capacity

from .prefixes import EMPTY as _EMPTY
from .prefixes import Assignment, assign, pid_bytes, prefix_id, unpack

__all__ = ["PREFIX_BYTES", "Plan", "Router", "request_key"]

PREFIX_BYTES = 256
"""Bytes of a completion prompt (or embedding input) that form its routing key."""

_RING_CACHE = 256
"""Rings kept (one per deployment and ready set); a new set builds one in ~0.2 ms per node."""

_PID_CACHE = 4096
"""Routing keys whose prefix id is remembered (cleared when full)."""
MIN_CAPACITY = 2
"""In-flight requests any replica may hold before the load bound can move a request away
from its prefix's replica. With a floor of 1 the bound, ceil(1.25 * (total + 1) / n), is 1
whenever fewer than n requests run, so a second request for a busy prefix would go to a
cold replica, whose evaluation of a long prompt costs more than waiting behind one request.
Above n * 2 / 1.25 requests in flight the floor no longer matters: the bound is the
1.25 x mean rule."""
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
            key = model + b"\0" + (_text(system) + b"\0" + _text(user))[:PREFIX_BYTES]
            if req.prompt_cache_key is not None:  # OpenAI's hint: its own group of a prefix
                key += b"\0key\0" + req.prompt_cache_key.encode()
            return key
        case CompletionRequest():
            return model + b"\0" + _text(req.prompt)[:PREFIX_BYTES]
        case EmbeddingRequest():
            return model + b"\0" + _text(req.input)[:PREFIX_BYTES]
        case RerankRequest():
            return model + b"\0" + _text(req.query)[:PREFIX_BYTES]
    raise TypeError(f"no routing key for {type(req).__name__}")


class Plan(NamedTuple):
    """Where to try a request: Router.plan."""

    order: list[str]
    """Node ids in the order to try."""
    cap: int
    """The load cap every try but the last carries."""
    owner: str
    """The node the request belongs on (its prefix's owner, or the key's ring owner)."""


class Router:
    """Chooses among ready replicas; counts the requests this node has forwarded."""

    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR,
                 min_capacity: int = MIN_CAPACITY) -> None:
        self.load_factor = load_factor
        self.min_capacity = min_capacity
        self.forwarded: Counter[tuple[str, str]] = Counter()
        """(deployment, node id) -> requests this node has sent there and not yet seen
        answered."""
        self._rings: dict[tuple[str, frozenset[str]], Ring] = {}
        self._pids: dict[bytes, int] = {}  # recent routing key -> prefix id
        # deployment -> (ready set and ledgers, the ledgers and ring objects they came in,
        # the assignment computed from them)
        self._assigned: dict[str, tuple[object, Mapping[str, bytes], Ring, Assignment]] = {}

    def ring(self, name: str, nodes: frozenset[str]) -> Ring:
        key = (name, nodes)
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= _RING_CACHE:
                self._rings.clear()
            ring = self._rings[key] = Ring(nodes)
        return ring

    def plan(self, name: str, key: bytes, gossiped: Mapping[str, int],
             ledgers: Mapping[str, bytes] | None = None, local: str | None = None) -> Plan:
        """Ready node ids (the keys of `gossiped`, their replicas' gossiped in-flight counts;
        `local`: this node's id if it holds a ready replica, whose count is exact) in the
        order to try, and the bounded-load capacity each try but the last carries (the
        target refuses when its replica already holds that many: Node.serve).
        With `ledgers` (node id -> its packed prefix ids for `name`; a generative request)
        the walk starts at the prefix's owner, else on the ring walk from the key. The first
        target is the first of that walk that this node knows to be under the capacity (its
        own forwarded count, or the exact local one), then the rest of the walk; `owner` is
        the walk's first (a request sent elsewhere is a spill, which claims no prefix).
        An empty Plan when none."""
        if not gossiped:
            return Plan([], 0, "")
        if len(gossiped) == 1:  # nothing to choose: no ring, prefix id or assignment
            ((n, load),) = gossiped.items()
            total = max(load, load if n == local else self.forwarded.get((name, n), 0))
            return Plan([n], bounded_capacity(total, 1, self.load_factor, self.min_capacity), n)
        ring = self.ring(name, frozenset(gossiped))
        forwarded = self.forwarded.get
        known: dict[str, int] = {}
        total = 0
        for n, load in gossiped.items():
            ours = load if n == local else forwarded((name, n), 0)
            known[n] = ours
            total += max(load, ours)
        if ledgers is None:
            order = ring.order(key)
        else:
            pid = self._pid(key)
            assignment = self._assignment(name, ring, ledgers)
            order = assignment.orders.get(pid)  # fixed while the assignment is
            if order is None:
                order = assignment.order(pid, ring.order(pid_bytes(pid)))
        # Ring.choose_in's rule, with the capacity computed once: the first node of the walk
        # under it (one always is: `total` >= the sum of `known`, c >= 1).
        cap = bounded_capacity(total, len(known), self.load_factor, self.min_capacity)
        first = next((n for n in order if known[n] < cap), order[0])
        return Plan([first, *(n for n in order if n != first)], cap, order[0])

    def claims(self, name: str, key: bytes, me: str, ledgers: Mapping[str, bytes]) -> bool:
        """Whether replica `me` of `name` should add the prefix of `key`, which it is serving,
        to its ledger: when no ledger has the prefix yet (the first server claims it), or when
        the assignment gives it to `me`. A spilled request (its owner was busy) warms this
        replica's cache but claims nothing, so a spill never moves a prefix: otherwise each
        spill would add an advertiser, and the assignment, which prefers advertisers in ring
        order, could move the prefix, and with it others."""
        ring = self.ring(name, frozenset(ledgers))
        pid = self._pid(key)
        owner = self._assignment(name, ring, ledgers).owner.get(pid)
        return owner is None or owner == me

    def ceded(self, name: str, me: str, ledgers: Mapping[str, bytes]) -> frozenset[int]:
        """The prefix ids in replica `me`'s ledger (as gossiped, in `ledgers`) that the
        assignment gives to another replica advertising them too: `me` drops them, so a prefix
        that moved has one advertiser again. Kept in the old replica's ledger (for up to
        PREFIX_TTL_S), it would make two advertisers, and the assignment, which keeps a prefix
        on the first advertiser in ring order with room, could move it back, and another with
        it (measured: 11 of 36 requests switched replica in bench/prefix_affinity). A prefix
        whose new owner does not advertise it yet stays, or it would look new."""
        if me not in ledgers:
            return frozenset()
        assignment = self._assignment(name, self.ring(name, frozenset(ledgers)), ledgers)
        advertised, owner = assignment.advertised, assignment.owner
        return frozenset(pid for pid in advertised.get(me, _EMPTY)
                         if owner[pid] != me and pid in advertised.get(owner[pid], _EMPTY))

    def _pid(self, key: bytes) -> int:
        pid = self._pids.get(key)
        if pid is None:
            if len(self._pids) >= _PID_CACHE:
                self._pids.clear()
            pid = self._pids[key] = prefix_id(key)
        return pid

    def _assignment(self, name: str, ring: Ring, ledgers: Mapping[str, bytes]) -> Assignment:
        """The assignment for `name` over `ring` from the gossiped `ledgers`, recomputed only
        when they changed."""
        cached = self._assigned.get(name)
        if cached is not None and cached[1] is ledgers and cached[2] is ring \
                and type(ledgers) is MappingProxyType:
            return cached[3]  # the same read-only gossiped view (peers.Routing) as last time
        state = (ring.nodes, tuple(sorted(ledgers.items())))
        if cached is not None and cached[0] == state:
            self._assigned[name] = (state, ledgers, ring, cached[3])
            return cached[3]
        assignment = assign(ring, {n: unpack(ledgers.get(n, b"")) for n in ring.nodes})
        if len(self._assigned) >= _RING_CACHE:
            self._assigned.clear()
        self._assigned[name] = (state, ledgers, ring, assignment)
        return assignment

    @contextlib.contextmanager
    def track(self, name: str, node_id: str) -> Iterator[None]:
        """Count a request for deployment `name` forwarded to `node_id` while it runs."""
        self.sent(name, node_id)
        try:
            yield
        finally:
            self.answered(name, node_id)

    def sent(self, name: str, node_id: str) -> None:
        """A request for `name` was forwarded to `node_id` (for callers that cannot use
        track(): a callback ends it with answered())."""
        self.forwarded[(name, node_id)] += 1

    def answered(self, name: str, node_id: str) -> None:
        """The request sent() to `node_id` is over."""
        key = (name, node_id)
        self.forwarded[key] -= 1
        if self.forwarded[key] <= 0:
            del self.forwarded[key]
