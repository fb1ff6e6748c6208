"""What this node knows of its peers from gossip: their metas, addresses and ready replicas.

The mesh carries each member's meta (NodeMeta, msgpack) and load (NodeLoad) as bytes; decoding
them is cached by their bytes, which repeat until the peer changes them. Revoked members are
left out. `holders(name)` is what routing asks on every request, so it is cached for
HOLDERS_TTL_S.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import msgspec

from meshnode.mesh import Member, MemberState

from .cluster import Cluster, NodeLoad, NodeMeta
from .peer_queries import Answer, Contact, ask_peers
from .reach import Reachability
from .security import ClusterSecurity

__all__ = ["HOLDERS_TTL_S", "PLACEMENT_STATES", "SUSPECT_GRACE_S", "PeerView", "Routing",
           "Target"]

HOLDERS_TTL_S = 0.05
"""How long a deployment's list of ready peers and their gossiped loads is reused."""
PLACEMENT_STATES = (MemberState.ALIVE, MemberState.SUSPECT)
"""Members placement and routing count on: a suspect keeps its replicas until it is declared
dead, so a brief suspicion (a busy machine) moves no model and refuses no request. Routing
tries a member suspect for SUSPECT_GRACE_S or more last (`usable`): a frozen machine accepts
connections but answers nothing, and a request sent there would wait until membership declares
it dead. Requests already sent to it and not answered yet move on too (`suspected`)."""
SUSPECT_GRACE_S = 1.0
"""How long a suspicion lasts before routing tries that member last and the requests waiting
on it with no answer yet and another replica to try go there. A member suspected by mistake
(a busy moment) hears of it and refutes within a gossip round or two, so a shorter suspicion
moves no prefix and no request; a frozen one stays suspect until declared dead (LAN timings:
~4 s or more)."""
_CACHE_MAX = 1024

_meta_decoder = msgspec.msgpack.Decoder(NodeMeta)
_load_decoder = msgspec.msgpack.Decoder(NodeLoad)


class Target(msgspec.Struct, frozen=True):
    """A node to send a request to: this one (`local`) or a peer at `url`."""

    node_id: str
    name: str
    url: str
    local: bool


class Routing(NamedTuple):
    """The ready peer holders of a deployment, split the way Router.plan takes them."""

    targets: dict[str, Target]
    loads: dict[str, int]
    """Each holder's gossiped in-flight count for the deployment."""
    ledgers: MappingProxyType[str, bytes]
    """Each holder's packed prefix ids for the deployment (read-only: the router may reuse
    what it computed from the same object)."""
    sole: Target | None
    """The holder when there is exactly one."""
    suspects: frozenset[str]
    """The holders membership has suspected for SUSPECT_GRACE_S or more (they missed their
    probes: frozen, or very busy)."""


class PeerView:
    """The other members as this node sees them (see the module docstring)."""

    def __init__(self, node_id: Callable[[], str], cluster: Callable[[], Cluster | None],
                 security: ClusterSecurity | None) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._security = security
        self._metas: dict[bytes, NodeMeta | None] = {}
        self._gone_hooks: list[Callable[[str], object]] = []
        self._stuck_hooks: list[Callable[[str, str], object]] = []
        self._watches: dict[str, asyncio.TimerHandle] = {}  # suspects, by node id
        self.reach = Reachability(
            lambda: security.client_context() if security is not None else None,
            on_down=lambda url: self._stuck(url, "unreachable from this node"))
        """Peers this node failed to connect to, which routing skips (reach.py)."""
        # deployment -> (valid until, {peer id: (Target, gossiped in-flight, packed ids)})
        self._holders: dict[str, tuple[float, dict[str, tuple[Target, int, bytes]],
                                       Routing]] = {}

    def decode_meta(self, data: bytes) -> NodeMeta | None:
        try:
            return self._metas[data]
        except KeyError:
            pass
        if len(self._metas) > _CACHE_MAX:
            self._metas.clear()
        try:
            meta: NodeMeta | None = _meta_decoder.decode(data) if data else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            meta = None
        self._metas[data] = meta
        return meta

    def peers(self, states: tuple[MemberState, ...]) -> list[tuple[str, NodeMeta, bytes]]:
        """(node id, meta, load bytes) of the other members in `states` with a valid meta."""
        return [(m.node_id, meta, m.load) for m, meta in self._members(states)]

    def _members(self, states: tuple[MemberState, ...]) -> list[tuple[Member, NodeMeta]]:
        """The other members in `states` with a valid meta, and that meta."""
        cluster = self._cluster()
        if cluster is None:
            return []
        out = []
        me, security = self._node_id(), self._security
        for m in cluster.mesh.members():
            if m.node_id == me or m.state not in states:
                continue
            if security is not None and security.is_revoked(m.node_id):
                continue
            meta = self.decode_meta(m.meta)
            if meta is not None:
                out.append((m, meta))
        return out

    def own_prefixes(self, name: str, live: bytes) -> bytes:
        """The prefix ids of our replica of `name` as we last gossiped them, not our `live`
        ledger (routing must see what every other node sees); `live` without a mesh."""
        cluster = self._cluster()
        meta = self.decode_meta(cluster.gossiped_meta) if cluster is not None else None
        return live if meta is None else dict(meta.prefixes).get(name, b"")

    async def ask(self, path: str, params: dict[str, str]) -> list[Answer]:
        """GET a node-to-node `path` from every alive peer at once (peer_queries.py), over
        mTLS with each answer's certificate checked in a signed cluster."""
        sec = self._security
        return await ask_peers(self.contacts(), path, params,
                               ssl_context=sec.client_context() if sec else None,
                               verify=self.verify if sec else None)

    def verify(self, ssl_object: object, node_id: str) -> None:
        """Raise unless the TLS peer is node `node_id` of this cluster and not revoked
        (a no-op in an open cluster)."""
        if self._security is not None:
            self._security.check_peer(ssl_object, node_id)  # type: ignore[arg-type]

    def on_gone(self, hook: Callable[[str], object]) -> Callable[[], None]:
        """Have `hook(url)` called with a peer's node-to-node URL when membership declares
        it dead or it leaves (a forwarding pool drops its connections there); the undo."""
        self._gone_hooks.append(hook)
        return lambda: self._gone_hooks.remove(hook)

    def on_stuck(self, hook: Callable[[str, str], object]) -> Callable[[], None]:
        """Have `hook(url, why)` called with a peer's node-to-node URL when it is likely not
        to answer: this node cannot connect there (reach.py), or membership has suspected it
        for SUSPECT_GRACE_S (`suspected`). A forwarding pool moves the requests waiting on it;
        the undo."""
        self._stuck_hooks.append(hook)
        return lambda: self._stuck_hooks.remove(hook)

    def _stuck(self, url: str, why: str) -> None:
        for hook in list(self._stuck_hooks):
            hook(url, why)

    def suspected(self, member: Member) -> None:
        """Membership suspects `member`: if it still does SUSPECT_GRACE_S later at the same
        incarnation (it did not refute: frozen, or cut off), tell the on_stuck hooks (needs a
        running loop)."""
        self._unwatch(member.node_id)
        self._watches[member.node_id] = asyncio.get_running_loop().call_later(
            SUSPECT_GRACE_S, self._still_suspect, member.node_id, member.incarnation)

    def _still_suspect(self, node_id: str, incarnation: int) -> None:
        self._watches.pop(node_id, None)
        cluster = self._cluster()
        for m in cluster.mesh.members() if cluster is not None else ():
            if m.node_id == node_id and m.state is MemberState.SUSPECT \
                    and m.incarnation == incarnation:
                meta = self.decode_meta(m.meta)
                if meta is not None:
                    self._stuck(self.url(meta), f"its node {meta.name} is suspected by "
                                                f"membership (not answering probes)")

    def _unwatch(self, node_id: str) -> None:
        watch = self._watches.pop(node_id, None)
        if watch is not None:
            watch.cancel()

    def close(self) -> None:
        """Stop the background tries and suspicion watches; safe to call twice."""
        self.reach.close()
        for node_id in list(self._watches):
            self._unwatch(node_id)

    def gone(self, member: Member) -> None:
        """Membership declared `member` dead, or it left: tell the on_gone hooks."""
        self.reach.forget(member.node_id)
        self._unwatch(member.node_id)
        meta = self.decode_meta(member.meta)
        if meta is not None:
            for hook in list(self._gone_hooks):
                hook(self.url(meta))

    def check_reach(self, member: Member) -> None:
        """Membership saw `member` answer only through another member: check that this node
        can still connect to it (reach.check)."""
        meta = self.decode_meta(member.meta)
        if meta is not None:
            self.reach.check(member.node_id, meta.name, self.url(meta))

    def usable(self, targets: list[Target], suspects: frozenset[str]) -> list[Target]:
        """`targets` (in order) with the `suspects` (Routing.suspects) moved last and the
        peers this node cannot connect to left out, unless none would remain (reach.skip).
        The prefix's owner does not change: the next replica serves it as a spill."""
        if suspects:
            targets = [t for t in targets if t.node_id not in suspects] + \
                      [t for t in targets if t.node_id in suspects]
        return self.reach.skip(targets)

    def contacts(self) -> list[Contact]:
        """(name, node-to-node URL, node id) of every alive peer that listens (a node
        started on port 0 gossips its port once it is bound)."""
        signed = self._security is not None
        return [(meta.name, self.url(meta), node_id)
                for node_id, meta, _ in self.peers((MemberState.ALIVE,))
                if (meta.internal_port if signed else meta.http_port)]

    def url(self, meta: NodeMeta) -> str:
        """Base URL for node-to-node calls to a peer: its internal mTLS listener in a signed
        cluster, its public API in an open one."""
        if self._security is not None:
            return f"https://{meta.http_host}:{meta.internal_port}"
        return f"http://{meta.http_host}:{meta.http_port}"

    def changed(self) -> None:
        """A member joined, left or changed its meta: holders() reads the view afresh. (A
        holder that became ready is seen at once: otherwise a node that unloaded its own
        replica, having seen the new holder ready, could still route from a list without it
        for up to HOLDERS_TTL_S and answer 503.)"""
        self._holders.clear()

    def holders(self, name: str) -> tuple[dict[str, tuple[Target, int, bytes]], frozenset[str]]:
        """Peers with a ready replica of `name`, their gossiped in-flight counts and the
        prefix ids their replica of `name` served (packed, prefixes.py), reused for
        HOLDERS_TTL_S: gossip refreshes them no faster (loads ride on probes and acks), a
        holder that died meanwhile fails at connect and the next one is tried, and this
        node's own in-flight counts (Router.forwarded) stay live on top; and the suspects
        among them (Routing.suspects)."""
        _, holders, routing = self._cached(name)
        return holders, routing.suspects

    def routing(self, name: str) -> Routing:
        """holders(name) as Router.plan takes them, built once per holders() list (the
        dicts are the same objects while it is reused, which the router's caches use)."""
        return self._cached(name)[2]

    def _cached(self, name: str) -> tuple[float, dict[str, tuple[Target, int, bytes]], Routing]:
        now = time.monotonic()
        cached = self._holders.get(name)
        if cached is not None and cached[0] > now:
            return cached
        members = [m for m in self._members(PLACEMENT_STATES) if (name, "ready") in m[1].replicas]
        holders = {m.node_id: (Target(m.node_id, meta.name, self.url(meta), False),
                               replica_in_flight(m.load, name), dict(meta.prefixes).get(name, b""))
                   for m, meta in members}
        targets = {n: h[0] for n, h in holders.items()}
        routing = Routing(targets, {n: h[1] for n, h in holders.items()},
                          MappingProxyType({n: h[2] for n, h in holders.items()}),
                          next(iter(targets.values())) if len(targets) == 1 else None,
                          frozenset(m.node_id for m, _ in members
                                    if m.state is MemberState.SUSPECT
                                    and now - m.state_change >= SUSPECT_GRACE_S))
        if len(self._holders) > _CACHE_MAX:
            self._holders.clear()
        cached = self._holders[name] = (now + HOLDERS_TTL_S, holders, routing)
        return cached


@functools.lru_cache(maxsize=_CACHE_MAX)  # a peer's load bytes repeat until its load changes
def _decode_load(load: bytes) -> NodeLoad:
    try:
        return _load_decoder.decode(load) if load else NodeLoad()
    except (msgspec.DecodeError, msgspec.ValidationError):
        return NodeLoad()


def replica_in_flight(load: bytes, name: str) -> int:
    """The in-flight count of deployment `name`'s replica in a peer's gossiped load (its
    node's whole count from a peer that gossips none per replica); 0 if it cannot be read."""
    decoded = _decode_load(load)
    if decoded.replicas is None:
        return decoded.in_flight
    for replica, count in decoded.replicas:
        if replica == name:
            return count
    return 0
