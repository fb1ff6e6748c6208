"""A simulated network that drives many ``Swim`` cores with a fake clock.

An event-queue simulation: nothing sleeps, time jumps from one event to the next, so a
1000-node cluster runs many simulated seconds per real second. Every random choice (loss,
jitter, each core's rng) derives from one seed: a run is reproduced exactly from its seed.

Links: base latency + uniform jitter, per-link loss (or a global rate), per-link extra delay,
partitions (nodes in different groups cannot exchange anything), crashed nodes (no ticks, all
traffic to them dropped). UDP datagrams are lost independently. A TCP exchange (connect,
request, one reply) is reliable but slow under loss: every lost segment costs a retransmission
timeout (1 s doubling for the handshake, 0.2 s doubling after), and an exchange that takes
longer than stream_timeout_s fails as a whole, as do exchanges across a partition.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import heapq
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from meshnode.mesh import Event, MemberState, MeshConfig, Output, StaticDelegate, Swim
from meshnode.mesh.wire import Addr, NodeState

Link = tuple[Addr, Addr]


def node_id_for(seed: int, index: int) -> str:
    """A node id of the real shape (26 chars of base32, like a key id)."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()[:16]
    return base64.b32encode(digest).decode().rstrip("=").lower()


@dataclass(eq=False)
class SimNode:
    index: int
    name: str
    node_id: str
    addr: Addr
    swim: Swim
    delegate: StaticDelegate
    up: bool = True
    sched: float = math.inf
    events: list[tuple[float, Event]] = field(default_factory=list)

    def view(self, node_id: str) -> MemberState | None:
        member = self.swim.member(node_id)
        return member.state if member is not None else None


class Sim:
    def __init__(self, seed: int, config: MeshConfig | None = None, *, latency_s: float = 0.001,
                 jitter_s: float = 0.002, loss: float = 0.0, cluster: str = "simcluster",
                 record_events: bool = True, log_level: int = logging.ERROR) -> None:
        self.seed = seed
        self.config = config if config is not None else MeshConfig.lan()
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.link_loss: dict[Link, float] = {}
        self.link_delay: dict[Link, float] = {}
        self.cluster = cluster
        self.record_events = record_events
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Addr, SimNode] = {}
        self.by_id: dict[str, SimNode] = {}
        self.group: dict[Addr, int] = {}
        self.bytes_sent: Counter[int] = Counter()
        self.max_packet = 0
        self.on_event: Callable[[SimNode, float, Event], None] | None = None
        self._log = structlog.wrap_logger(
            structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(log_level))
        self._queue: list[tuple[float, int, str, tuple]] = []
        self._seq = 0

    # ---- building the cluster -------------------------------------------------------------

    def add_node(self, *, meta: bytes = b"", join: Iterable[SimNode] = (),
                 config: MeshConfig | None = None, node_id: str | None = None,
                 addr: Addr | None = None) -> SimNode:
        i = len(self.nodes)
        node_id = node_id or node_id_for(self.seed, i)
        addr = addr or (f"10.{i // 250}.{i % 250}.1", 7701)
        delegate = StaticDelegate(meta=meta)
        swim = Swim(config or self.config, node_id=node_id, name=f"n{i}", addr=addr,
                    rng=random.Random(self.rng.getrandbits(64)), now=self.now,
                    cluster=self.cluster, delegate=delegate, log=self._log.bind(node=f"n{i}"))
        node = SimNode(i, f"n{i}", node_id, addr, swim, delegate)
        self.nodes.append(node)
        self.by_addr[addr] = node
        self.by_id[node_id] = node
        self._reschedule(node)
        seeds = [s.addr for s in join]
        if seeds:
            self._apply(node, swim.join(self.now, seeds))
        return node

    def restart(self, old: SimNode, *, join: Iterable[SimNode] = ()) -> SimNode:
        """A new process with the same id and address (incarnation starts over at 1)."""
        old.up = False
        self.by_addr.pop(old.addr)
        return self.add_node(node_id=old.node_id, addr=old.addr, join=join)

    def bootstrap(self, n: int) -> list[SimNode]:
        """n nodes that already know each other (a converged cluster), without the join storm."""
        nodes = [self.add_node() for _ in range(n)]
        states = [_state(node) for node in nodes]
        # n^2 long-lived records: the cyclic GC would rescan them all at every generation
        # threshold while they are allocated (they hold no cycles).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for node in nodes:
                node.swim.preload(self.now, states)
                self._reschedule(node)
        finally:
            if gc_was_enabled:
                gc.enable()
        return nodes

    # ---- faults ---------------------------------------------------------------------------

    def crash(self, node: SimNode) -> None:
        node.up = False

    def partition(self, *groups: Iterable[SimNode]) -> None:
        self.group = {node.addr: g for g, members in enumerate(groups) for node in members}

    def heal(self) -> None:
        self.group = {}

    def link_ok(self, a: Addr, b: Addr) -> bool:
        return self.group.get(a, -1) == self.group.get(b, -1)

    def cut(self, node: SimNode, loss: float = 1.0) -> None:
        """Set the loss of every link to and from ``node``."""
        for other in self.nodes:
            self.link_loss[(node.addr, other.addr)] = loss
            self.link_loss[(other.addr, node.addr)] = loss

    def uncut(self, node: SimNode) -> None:
        for other in self.nodes:
            self.link_loss.pop((node.addr, other.addr), None)
            self.link_loss.pop((other.addr, node.addr), None)

    # ---- running ----------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, t_end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= t_end:
            t, _, kind, args = heapq.heappop(queue)
            self.now = t
            match kind:
                case "tick":
                    node, when = args
                    if node.up and node.sched == when:
                        node.sched = math.inf
                        self._apply(node, node.swim.tick(t))
                case "udp":
                    dst, src, data = args
                    node = self.by_addr.get(dst)
                    if node is not None and node.up:
                        self._apply(node, node.swim.receive(t, data, src))
                case "tcp":
                    self._deliver_stream(*args)
                case "call":
                    args[0]()
        self.now = t_end

    def run_until_true(self, predicate: Callable[[], bool], timeout_s: float,
                       step_s: float = 0.1) -> float | None:
        """Run until ``predicate()`` holds (checked every step_s); the time it took, or None."""
        start = self.now
        while self.now - start < timeout_s:
            if predicate():
                return self.now - start
            self.run_for(step_s)
        return self.now - start if predicate() else None

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._push(t, "call", (fn,))

    # ---- views ------------------------------------------------------------------------------

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]

    def converged(self, nodes: Iterable[SimNode] | None = None) -> bool:
        """Every given live node sees every other given node alive."""
        nodes = [n for n in (nodes if nodes is not None else self.live()) if n.up]
        ids = [n.node_id for n in nodes]
        return all(n.view(i) == MemberState.ALIVE for n in nodes for i in ids)

    def fraction_seeing(self, node_id: str, states: set[MemberState],
                        observers: Iterable[SimNode] | None = None) -> float:
        obs = [n for n in (observers if observers is not None else self.live())
               if n.up and n.node_id != node_id]
        return sum(n.view(node_id) in states for n in obs) / max(1, len(obs))

    # ---- internals --------------------------------------------------------------------------

    def _push(self, t: float, kind: str, args: tuple) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, kind, args))

    def _reschedule(self, node: SimNode) -> None:
        deadline = max(node.swim.next_deadline(), self.now)
        if deadline < node.sched:
            node.sched = deadline
            self._push(deadline, "tick", (node, deadline))

    def _delay(self, a: Addr, b: Addr) -> float:
        return self.latency_s + self.rng.random() * self.jitter_s + self.link_delay.get((a, b), 0)

    def _apply(self, node: SimNode, out: Output) -> None:
        for dst, data in out.packets:
            self.bytes_sent[node.index] += len(data)
            self.max_packet = max(self.max_packet, len(data))
            if not self.link_ok(node.addr, dst):
                continue
            loss = self.link_loss.get((node.addr, dst), self.loss)
            if loss and self.rng.random() < loss:
                continue
            self._push(self.now + self._delay(node.addr, dst), "udp", (dst, node.addr, data))
        for dst, body in out.streams:
            self.bytes_sent[node.index] += len(body)
            # Connection set-up (SYN, SYN-ACK: retransmitted after 1 s, 2 s, ...) + request.
            delay = self._tcp_leg(node.addr, dst, 1.0) + self._tcp_leg(dst, node.addr, 1.0)
            delay += self._tcp_leg(node.addr, dst, 0.2)
            self._push(self.now + delay, "tcp", (node, dst, body, False, delay))
        if out.events:
            for event in out.events:
                if self.record_events:
                    node.events.append((self.now, event))
                if self.on_event is not None:
                    self.on_event(node, self.now, event)
        self._reschedule(node)

    def _tcp_leg(self, a: Addr, b: Addr, rto_s: float) -> float:
        """Time for one TCP segment to get through: each loss costs a retransmission
        timeout, doubled every time (the kernel's exponential backoff)."""
        delay, loss = self._delay(a, b), self.link_loss.get((a, b), self.loss)
        while loss and self.rng.random() < loss and rto_s < 64:
            delay += rto_s
            rto_s *= 2
        return delay

    def _deliver_stream(self, src: SimNode, dst: Addr, body: bytes, is_reply: bool,
                        elapsed: float) -> None:
        if elapsed > self.config.stream_timeout_s:
            return  # the requester gave up
        if is_reply:  # dst is the server here; src the requester
            if src.up and self.by_id.get(src.node_id) is src and self.link_ok(src.addr, dst):
                self._apply(src, src.swim.on_stream(self.now, body, dst))
            return
        server = self.by_addr.get(dst)
        if server is None or not server.up or not self.link_ok(src.addr, dst):
            return  # connection refused or timed out: the exchange fails as a whole
        out = server.swim.on_stream(self.now, body, src.addr)
        if out.reply is not None:
            self.bytes_sent[server.index] += len(out.reply)
            delay = self._tcp_leg(dst, src.addr, 0.2)
            self._push(self.now + delay, "tcp", (src, server.addr, out.reply, True,
                                                 elapsed + delay))
        self._apply(server, out)


def _state(node: SimNode) -> NodeState:
    m = node.swim.local_member()
    return NodeState(m.node_id, m.name, m.addr, m.meta, m.incarnation, m.state, m.load, 0)


def sim_seed(default: int) -> int:
    """The seed of a randomised test: MESH_SIM_SEED if set, else ``default``; printed so a
    failure can be replayed."""
    import os

    seed = int(os.environ.get("MESH_SIM_SEED", default))
    print(f"simulation seed: {seed} (replay with MESH_SIM_SEED={seed})")
    return seed
