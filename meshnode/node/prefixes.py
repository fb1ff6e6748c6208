"""Which prompt prefixes each replica serves: the ledger a node gossips, and the balanced
assignment of prefixes to replicas that every node computes from the gossiped ledgers.

A prefix id is 32 bits of a hash of a generative request's routing key (router.request_key:
model, system prompt and first user message, or a prompt's first bytes)::

    pid = blake2b32(key, person="meshnode/prefix")        # big-endian u32

Ledger (one per node, `PrefixLedger`): for each local replica, the ids of the prefixes it
served in the last `ttl_s`, at most `per_replica` of them, the least recently served dropped
first. It approximates what the replica's KV and prompt caches hold, as SGLang's router
approximates its workers' radix caches by what it sent them. Gossiped in NodeMeta.prefixes as
(deployment, the ids sorted and packed as big-endian u32): the bytes change only when the set
does, so a meta update (one incarnation) goes out only when a prefix is new to a replica or
ages out, at most once a second (the meta check).

Assignment (`assign`, every node, per deployment, from the ready replicas' ledgers)::

    K     = distinct ids in the ledgers;  R = ready replicas;  cap = ceil(K / R)
    for pid in sorted(ids):                    # one fixed order, so every node agrees
        owner[pid] = the first of ring.order(pid) that advertises pid and holds < cap
    for each pid left, in the same order:
        owner[pid] = the first of ring.order(pid) that holds < cap

Sticky (a prefix stays on a replica that has it while that replica holds no more than its
share) and balanced (no replica owns more than ceil(K / R) prefixes): with three prefixes and
three replicas each gets one, where a plain consistent-hash ring puts two on one replica 7
times in 9. Two nodes that saw two new prefixes at the same moment may send both to one
replica; once the ledgers are gossiped (about a second) the assignment moves one of them,
which costs that prefix one cold evaluation on its new replica. A prefix in no ledger yet goes
to the first replica of its own ring walk: every node picks the same one, and a burst of new
prefixes spreads like a ring before the ledgers catch up. (Sending it to the replica owning
the fewest sent a whole burst to one replica, since no count moves until the ledgers are
gossiped.) Once they are, the assignment evens out anything over ceil(K / R).

Every input is gossiped state (a node counts its own ledger as it last gossiped it, not as it
is now), so nodes with the same view make the same choice, new prefixes included. A replica
claims a prefix (adds it to its ledger) only when it is the prefix's owner or nobody owns it
yet (Router.claims): a request spilled there by the load bound warms its cache but moves no
prefix. A replica drops from its ledger a prefix assigned to another replica once that one
advertises it (Router.ceded, at each meta check), so each prefix settles on one advertiser.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import msgspec

from meshnode.mesh import MeshConfig
from meshnode.mesh.hashing import Ring

from .cluster import NodeMeta

__all__ = ["EMPTY", "PREFIXES_PER_REPLICA", "PREFIX_TTL_S", "PrefixLedger", "Assignment", "assign",
           "pid_bytes", "prefix_id", "unpack"]

PREFIXES_PER_REPLICA = 16
"""Prefix ids a replica advertises: 16 cost 64 bytes of the 1 KB meta per replica. Past 16
live prefixes per replica the counts saturate and the assignment degrades to ring order,
which spreads many prefixes evenly anyway."""
PREFIX_TTL_S = 600.0
"""A prefix not served for this long leaves the ledger: its KV state has likely been evicted
(a llama.cpp replica keeps ~11,000 tokens of SmolLM2 prompt states by default)."""


_META_BYTES = MeshConfig().meta_max_bytes
EMPTY: frozenset[int] = frozenset()
"""The prefix ids of a replica with no ledger."""
_ORDERS_MAX = 4096  # prefix orders an Assignment remembers (cleared when full)
_encode = msgspec.msgpack.encode


def prefix_id(key: bytes) -> int:
    """The 32-bit id of a routing key."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=4, person=b"meshnode/prefix")
                          .digest(), "big")


def pid_bytes(pid: int) -> bytes:
    """The ring key of a prefix id (its assignment and retry order)."""
    return pid.to_bytes(4, "big")


@functools.lru_cache(maxsize=1024)  # a peer's packed ids repeat until its ledger changes
def unpack(packed: bytes) -> frozenset[int]:
    """The ids in a gossiped ledger entry; empty if it is not a whole number of u32s."""
    if len(packed) % 4:
        return frozenset()
    return frozenset(int.from_bytes(packed[i:i + 4], "big") for i in range(0, len(packed), 4))


class PrefixLedger:
    """This node's record of the prefixes each local replica served (see the module doc)."""

    def __init__(self, per_replica: int = PREFIXES_PER_REPLICA, ttl_s: float = PREFIX_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_replica, self.ttl_s, self._clock = per_replica, ttl_s, clock
        self._seen: dict[str, OrderedDict[int, float]] = {}  # name -> pid -> last served
        self._packed: dict[str, bytes] = {}  # name -> sorted ids packed, while unchanged

    def record(self, name: str, key: bytes) -> None:
        """Replica `name` serves a request with routing `key`."""
        seen = self._seen.setdefault(name, OrderedDict())
        pid = prefix_id(key)
        if pid in seen:
            seen.move_to_end(pid)
        else:
            self._packed.pop(name, None)
            if len(seen) >= self.per_replica:
                seen.popitem(last=False)
        seen[pid] = self._clock()

    def forget(self, name: str, pids: Iterable[int]) -> None:
        """Drop `pids` from replica `name`'s ledger (prefixes assigned elsewhere)."""
        seen = self._seen.get(name)
        for pid in pids if seen else ():
            if seen.pop(pid, None) is not None:
                self._packed.pop(name, None)

    def packed(self, name: str) -> bytes:
        """Replica `name`'s live ids, sorted and packed (the gossiped form)."""
        packed = self._packed.get(name)
        if packed is None:
            seen = self._seen.get(name, {})
            packed = self._packed[name] = b"".join(pid_bytes(p) for p in sorted(seen))
        return packed

    def snapshot(self, names: Iterable[str], max_bytes: int) -> tuple[tuple[str, bytes], ...]:
        """(name, packed ids) of the replicas `names`, aged out by ttl_s, for NodeMeta: as
        msgpack at most `max_bytes` (the room a meta has left), keeping the most recent ids."""
        horizon = self._clock() - self.ttl_s
        names = sorted(names)
        for name in list(self._seen):
            seen = self._seen[name]
            if name not in names:
                del self._seen[name]
                self._packed.pop(name, None)
                continue
            while seen and next(iter(seen.values())) < horizon:
                seen.popitem(last=False)
                self._packed.pop(name, None)
        live = [n for n in names if self._seen.get(n)]
        out = tuple((n, self.packed(n)) for n in live)
        keep = self.per_replica
        while keep > 0 and len(_encode(out)) > max_bytes:
            keep //= 2  # ids per replica that fit, the most recent
            out = tuple((n, b"".join(pid_bytes(p) for p in sorted(list(self._seen[n])[-keep:])))
                        for n in live) if keep else ()
        return out

    def meta(self, meta: NodeMeta, names: Iterable[str]) -> NodeMeta:
        """`meta` with the ledgers of the replicas `names` in the room it has left."""
        room = _META_BYTES - len(_encode(meta)) - 8  # 8: the field's own msgpack framing
        return msgspec.structs.replace(meta, prefixes=self.snapshot(names, room))


class Assignment:
    """Prefix id -> owning replica, and how many prefixes each replica owns."""

    __slots__ = ("advertised", "counts", "orders", "owner")

    def __init__(self, owner: dict[int, str], counts: dict[str, int],
                 advertised: Mapping[str, frozenset[int]]) -> None:
        self.owner, self.counts, self.advertised = owner, counts, advertised
        self.orders: dict[int, tuple[str, ...]] = {}
        """Prefix id -> the replicas to try for it (order()), as computed so far."""

    def order(self, pid: int, walk: tuple[str, ...]) -> tuple[str, ...]:
        """The replicas to try for prefix `pid`, whose ring walk is `walk`: its owner (for a
        prefix in no ledger, the walk's first), the others advertising it, then the rest."""
        owner = self.owner.get(pid, walk[0])
        advertised = self.advertised
        order = (owner, *(n for n in walk if n != owner and pid in advertised.get(n, EMPTY)))
        order += tuple(n for n in walk if n not in order)
        if len(self.orders) >= _ORDERS_MAX:
            self.orders.clear()
        self.orders[pid] = order
        return order




def assign(ring: Ring, advertised: Mapping[str, frozenset[int]]) -> Assignment:
    """The balanced, sticky assignment of the module docstring over the ring's nodes;
    `advertised` maps a node id to the prefix ids its ledger holds."""
    nodes = ring.nodes
    ids = sorted(set().union(*(advertised.get(n, frozenset()) for n in nodes)))
    counts = dict.fromkeys(nodes, 0)
    owner: dict[int, str] = {}
    if not nodes:
        return Assignment(owner, counts, advertised)
    cap = math.ceil(len(ids) / len(nodes))
    empty: frozenset[int] = frozenset()
    left = []
    for pid in ids:  # first every prefix that can stay on a replica advertising it
        order = ring.order(pid_bytes(pid))
        chosen = next((n for n in order if counts[n] < cap and pid in advertised.get(n, empty)),
                      None)
        if chosen is None:
            left.append((pid, order))
        else:
            owner[pid] = chosen
            counts[chosen] += 1
    for pid, order in left:  # then the rest where there is room: cap * R >= K, one fits
        chosen = next(n for n in order if counts[n] < cap)
        owner[pid] = chosen
        counts[chosen] += 1
    return Assignment(owner, counts, advertised)
