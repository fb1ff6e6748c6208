"""Swim: the sans-I/O SWIM + Lifeguard state machine (after HashiCorp memberlist).

The core owns no socket, task or clock. The caller feeds it

    receive(now, datagram, from_addr)     a UDP datagram
    on_stream(now, body, from_addr)       a TCP frame body: a request, or the reply to ours
    tick(now)                             at or after next_deadline()

and sends what each call returns: ``Output.packets`` as UDP datagrams, ``Output.streams`` as
requests over TCP, each on a new connection, feeding the one reply frame back to on_stream
(push-pull exchanges and fallback pings), ``Output.reply`` back on the stream the request came
from; ``Output.events`` go to the application. ``now`` is any monotonic clock in seconds. Given
the same rng seed and inputs, the core does exactly the same thing.

Failure detection is in probe.py, merge rules in state.py, the member table in members.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import structlog

from . import wire
from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import MeshConfig, push_pull_scale
from .delegate import Delegate, StaticDelegate
from .errors import ConfigError, DecodeError
from .events import Event
from .members import Member, MemberTable, Node
from .probe import Prober
from .state import Membership
from .timers import Timers
from .wire import (
    Ack,
    Addr,
    Alive,
    Compound,
    Dead,
    MemberState,
    Msg,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

__all__ = ["LEAVE_DIRECT_MAX", "Output", "Swim"]

LEAVE_DIRECT_MAX = 64
"""A leaving node tells this many live members (random ones) directly, once each, before
gossip spreads it further: one burst of small packets, bounded in a large cluster."""


@dataclasses.dataclass(slots=True)
class Output:
    """What one call into the core asks the caller to do."""

    packets: list[tuple[Addr, bytes]] = dataclasses.field(default_factory=list)
    """UDP datagrams to send, each at most the packet budget."""
    streams: list[tuple[Addr, bytes]] = dataclasses.field(default_factory=list)
    """Request bodies to send over TCP, one connection each; feed the reply to on_stream."""
    events: list[Event] = dataclasses.field(default_factory=list)
    reply: bytes | None = None
    """From on_stream only: the body to answer on the same stream, if any."""


class Swim:
    def __init__(self, config: MeshConfig, *, node_id: str, name: str, addr: Addr,
                 rng: random.Random, now: float, cluster: str = "",
                 delegate: Delegate | None = None, max_packet_bytes: int | None = None,
                 log: Any = None) -> None:
        """``max_packet_bytes`` (default config.udp_buffer) is the budget of datagrams we
        build: the transport lowers it by what its packet sealer adds."""
        _check_identity(node_id, name, addr, cluster)
        self._cfg = config
        self._rng = rng
        self._cluster = cluster
        self._delegate: Delegate = delegate if delegate is not None else StaticDelegate()
        self._log = log if log is not None else structlog.get_logger("meshnode.mesh").bind(
            local=name)
        self._budget = config.udp_buffer if max_packet_bytes is None else max_packet_bytes
        if wire.largest_alive_packet(len(cluster), config.meta_max_bytes) > self._budget:
            raise ConfigError("max_packet_bytes cannot hold an alive message of meta_max_bytes")
        self._envelope = wire.envelope_size(cluster)
        self.stats: Counter[str] = Counter()
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue(config.retransmit_mult)
        self._timers = Timers()
        local = Node(node_id, name, addr, self._read_meta(), 1, MemberState.ALIVE, now)
        self._table = MemberTable(rng, local)
        self._state = Membership(config, self._table, self._queue, self._awareness,
                                 self._timers, self.stats, self._log)
        self._queue.queue(node_id, self._state.local_alive())
        self._prober = Prober(config, self._table, self._state, self._awareness, self._timers,
                              rng, self.stats, self._log, self._send, self._send_stream)
        self._load_version = 0
        self._out = Output()
        # First rounds at a random offset, so nodes started together do not act in lockstep.
        self._prober.start(now + rng.uniform(0, config.probe_interval_s))
        self._timers.at(now + rng.uniform(0, config.gossip_interval_s), "gossip")
        self._push_pull_gen = 0  # a re-staggered push-pull schedule voids the older timer
        self._stagger_push_pull(now)
        if config.reconnect_interval_s > 0:
            self._timers.at(now + rng.uniform(0, config.reconnect_interval_s), "reconnect")

    # ---- inspection ----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._table.local.node_id

    @property
    def health_score(self) -> int:
        """Lifeguard local health score, 0 (healthy) to awareness_max_multiplier - 1."""
        return self._awareness.score

    @property
    def leaving(self) -> bool:
        return self._state.leaving

    @property
    def leave_done(self) -> bool:
        """After leave(): the leave message was sent its full number of times (or there is
        nobody left to tell)."""
        if not self._state.leaving:
            return False
        return not self._queue.pending(self.node_id) or not self._live_peers()

    def members(self) -> list[Member]:
        """Every known member, the local node included, dead and left ones until reaped."""
        return [node.snapshot() for node in self._table.nodes.values()]

    def member(self, node_id: str) -> Member | None:
        node = self._table.get(node_id)
        return node.snapshot() if node is not None else None

    def local_member(self) -> Member:
        return self._table.local.snapshot()

    def node_id_at(self, addr: Addr) -> str | None:
        """Id of the member last seen at ``addr`` (for a packet sealer keyed by peer)."""
        return self._table.by_addr.get(addr)

    def next_deadline(self) -> float:
        """Core-clock time at which tick() next has work (may be early, never late)."""
        return self._timers.next_deadline()

    # ---- inputs ----------------------------------------------------------------------------

    def receive(self, now: float, data: bytes, from_addr: Addr) -> Output:
        """Handle one UDP datagram. Never raises for bad input: it is counted and dropped."""
        self.stats["packets.in"] += 1
        self.stats["bytes.in"] += len(data)
        try:
            msg = wire.decode_packet(data, self._cluster, self._cfg.udp_buffer)
        except DecodeError as exc:
            self.stats[f"drop.{exc.reason}"] += 1
            return self._flush()
        if isinstance(msg, Compound):
            for part in msg.msgs:
                self._handle(part, now, from_addr)
        elif isinstance(msg, PushPull):
            self.stats["drop.unexpected"] += 1
        else:
            self._handle(msg, now, from_addr)
        return self._flush()

    def on_stream(self, now: float, body: bytes, from_addr: Addr) -> Output:
        """Handle a TCP frame body: a push-pull or ping request (answered in
        ``Output.reply``), or the reply to one of our ``Output.streams``. Bad input is counted
        and dropped."""
        try:
            msg = wire.decode_packet(body, self._cluster, self._cfg.stream_max_bytes)
        except DecodeError as exc:
            self.stats[f"drop.{exc.reason}"] += 1
            return self._flush()
        match msg:
            case PushPull():
                self.stats["pushpull.in"] += 1
                if not msg.reply:  # answer with our state as it was before theirs is merged
                    self._out.reply = self._pushpull_body(join=msg.join, reply=True)
                self._state.merge(msg.states, now)
            case Ping(seq=seq, target=target) if target == self.node_id:
                load, version = self._local_load()
                ack = Ack(seq, self._table.local.inc, load, version)
                self._out.reply = wire.encode_packet(self._cluster, ack)
            case Ack():
                self._prober.on_tcp_ack(msg, now)
            case _:
                self.stats["drop.unexpected"] += 1
        return self._flush()

    def tick(self, now: float) -> Output:
        """Run every timer due at ``now``."""
        for kind, arg in self._timers.due(now):
            match kind:
                case ("probe" | "probe_indirect" | "probe_deadline" | "relay" | "relay_nack"
                      | "suspicion"):
                    self._prober.on_timer(kind, arg, now)
                case "gossip":
                    self._timers.at(now + self._cfg.gossip_interval_s, "gossip")
                    self._gossip(now)
                case "pushpull":
                    if arg == self._push_pull_gen:
                        self._push_pull(now)
                case "reconnect":
                    self._timers.at(now + self._cfg.reconnect_interval_s, "reconnect")
                    self._reconnect()
        return self._flush()

    def join(self, now: float, seeds: Iterable[Addr]) -> Output:
        """Ask each seed for a full-state exchange (``Output.streams``), flagged as a join."""
        body = self._pushpull_body(join=True, reply=False)
        self._out.streams.extend((tuple(seed), body) for seed in seeds)  # type: ignore[misc]
        return self._flush()

    def preload(self, now: float, states: Iterable[wire.NodeState]) -> None:
        """Add alive members we do not know yet, without gossip or events.

        For simulations that start from a converged cluster: reaching one through joins costs
        O(n^2 log n) messages, which a test of 1000 nodes cannot spend. Known members, and
        states other than alive, are ignored.
        """
        known, new = self._table.nodes, list[Node]()
        for r in states:
            if r.state == MemberState.ALIVE and r.node not in known:
                node = Node(r.node, r.name, r.addr, r.meta, r.inc, MemberState.ALIVE, now)
                node.load, node.load_key = r.load, (r.inc, r.load_version)
                new.append(node)
        self._table.add_many(new)
        # As if it had run with these members for a while: push-pulls spread over the
        # period of this cluster size rather than bunched in the first base interval.
        self._stagger_push_pull(now)

    def leave(self, now: float) -> Output:
        """Leave gracefully: "dead" about ourselves from ourselves, which others record as
        ``left``, sent at once to up to LEAVE_DIRECT_MAX live members (gossip alone may miss
        one, which then takes the silence for a failure and records ``dead``), then gossiped.
        Probing and push-pull stop; gossip goes on until ``leave_done``."""
        if not self._state.leaving:
            self._state.leaving = True
            local = self._table.local
            dead = Dead(local.inc, local.node_id, local.node_id)
            self._state.on_dead(dead, now)
            live = [n for n in self._table.nodes.values() if n is not local and not n.dead_or_left]
            for peer in self._rng.sample(live, min(len(live), LEAVE_DIRECT_MAX)):
                self._emit(peer.addr, wire.pack(self._cluster, [dead]))
            self._gossip(now)
        return self._flush()

    def update_meta(self, now: float) -> Output:
        """Re-read delegate.node_meta() and gossip it with a raised incarnation."""
        local = self._table.local
        local.meta = self._read_meta()
        local.inc += 1
        self._queue.queue(local.node_id, self._state.local_alive())
        return self._flush()

    # ---- dispatch --------------------------------------------------------------------------

    def _handle(self, msg: Msg, now: float, src: Addr) -> None:
        match msg:
            case Ping(seq=seq, target=target):
                if target != self.node_id:
                    self.stats["drop.wrong_node"] += 1
                    return
                load, version = self._local_load()
                self._send(src, [Ack(seq, self._table.local.inc, load, version)])
            case Ack():
                self._prober.on_ack(msg, now, src)
            case Nack(seq=seq):
                self._prober.on_nack(seq)
            case PingReq():
                self._prober.on_ping_req(msg, now, src)
            case Alive():
                self._state.on_alive(msg, now)
            case Suspect():
                self._state.on_suspect(msg, now)
            case Dead():
                self._state.on_dead(msg, now)

    # ---- dissemination -------------------------------------------------------------------

    def _live_peers(self) -> bool:
        return any(not n.dead_or_left and n is not self._table.local
                   for n in self._table.nodes.values())

    def _gossip(self, now: float) -> None:
        """Send queued updates to gossip_nodes random members: alive or suspect ones, and
        dead ones for gossip_to_the_dead_s (so a live node wrongly declared dead refutes)."""
        if not self._queue:
            return
        local, horizon = self._table.local, self._cfg.gossip_to_the_dead_s

        def skip(n: Node) -> bool:
            if n is local or n.state == MemberState.LEFT:
                return True
            return n.state == MemberState.DEAD and now - n.state_change > horizon

        budget = self._budget - self._envelope - wire.COMPOUND_OVERHEAD
        n = len(self._table)
        for peer in self._table.random_nodes(self._cfg.gossip_nodes, skip):
            msgs = self._queue.get(budget, n, wire.COMPOUND_MAX)
            if not msgs:
                return
            self._emit(peer.addr, wire.pack(self._cluster, msgs))

    def _send(self, addr: Addr, msgs: list[Msg]) -> None:
        """Send probe messages with as much queued gossip piggybacked as fits the budget."""
        used = sum(len(wire.encode_msg(m)) for m in msgs)
        room = self._budget - self._envelope - wire.COMPOUND_OVERHEAD - used
        extra = self._queue.get(room, len(self._table), wire.COMPOUND_MAX - len(msgs))
        self._emit(addr, wire.pack(self._cluster, msgs + extra))

    def _send_stream(self, addr: Addr, msg: Msg) -> None:
        self._out.streams.append((addr, wire.encode_packet(self._cluster, msg)))

    def _emit(self, addr: Addr, data: bytes) -> None:
        self.stats["packets.out"] += 1
        self.stats["bytes.out"] += len(data)
        self._out.packets.append((addr, data))

    def _stagger_push_pull(self, now: float) -> None:
        period = push_pull_scale(self._cfg.push_pull_interval_s, len(self._table))
        if period > 0:
            self._push_pull_gen += 1
            self._timers.at(now + self._rng.uniform(0, period), "pushpull", self._push_pull_gen)

    def _push_pull(self, now: float) -> None:
        period = push_pull_scale(self._cfg.push_pull_interval_s, len(self._table))
        self._timers.at(now + period, "pushpull", self._push_pull_gen)
        if self._state.leaving:
            return
        local = self._table.local
        peers = self._table.random_nodes(
            1, lambda m: m is local or m.state != MemberState.ALIVE)
        if peers:
            self.stats["pushpull.out"] += 1
            self._out.streams.append(
                (peers[0].addr, self._pushpull_body(join=False, reply=False)))

    def _reconnect(self) -> None:
        """Push-pull with a random dead member, with probability min(1, dead / alive)."""
        dead = self._table.dead()
        if not dead or self._state.leaving:
            return
        alive = len(self._table) - len(dead)
        if self._rng.random() < len(dead) / alive:
            peer = dead[self._rng.randrange(len(dead))]
            self.stats["reconnect"] += 1
            self._out.streams.append((peer.addr, self._pushpull_body(join=False, reply=False)))

    def _pushpull_body(self, *, join: bool, reply: bool) -> bytes:
        local = self._table.local
        load, version = self._local_load()
        local.load, local.load_key = load, (local.inc, version)
        states = tuple(node.to_wire() for node in self._table.nodes.values())
        return wire.encode_packet(self._cluster, PushPull(join, reply, states))

    # ---- local state -------------------------------------------------------------------------

    def _read_meta(self) -> bytes:
        meta = self._delegate.node_meta()
        if len(meta) > self._cfg.meta_max_bytes:
            raise ConfigError(f"node_meta() returned {len(meta)} bytes, over meta_max_bytes")
        return meta

    def _local_load(self) -> tuple[bytes, int]:
        """The delegate's load and its version, raised whenever the bytes change."""
        load = self._delegate.local_load()
        if len(load) > self._cfg.load_max_bytes:
            self.stats["local_load_too_large"] += 1
            load = b""
        local = self._table.local
        if load != local.load:
            local.load = load
            self._load_version += 1
        return load, self._load_version

    def _flush(self) -> Output:
        out, self._out = self._out, Output()
        if self._state.events:
            out.events.extend(self._state.events)
            self._state.events.clear()
        return out


def _check_identity(node_id: str, name: str, addr: Addr, cluster: str) -> None:
    if not 0 < len(node_id) <= wire.ID_MAX:
        raise ConfigError(f"node_id must be 1 to {wire.ID_MAX} characters")
    if len(name) > wire.NAME_MAX:
        raise ConfigError(f"name must be at most {wire.NAME_MAX} characters")
    if len(cluster) > wire.CLUSTER_MAX:
        raise ConfigError(f"cluster must be at most {wire.CLUSTER_MAX} characters")
    host, port = addr
    if not 0 < len(host) <= wire.HOST_MAX or not 0 <= port <= 65535:
        raise ConfigError(f"bad advertise address {addr!r}")
