"""Merge rules: how alive / suspect / dead messages and push-pull states change the table
(memberlist's aliveNode / suspectNode / deadNode / mergeState).

Invariants:
- a message about a member with an incarnation below the one we hold is ignored; at an equal
  incarnation, suspect beats alive and dead/left beats both;
- only the member itself raises its incarnation: an accusation (suspect or dead) about the
  local node, or an alive about it that differs from ours, is refuted by broadcasting alive
  with an incarnation above the accused one (and raises the Lifeguard health score);
- every accepted change is queued for gossip (at most one queued update per member);
- an address change for a known id is accepted only when the member left, or has been dead
  for dead_node_reclaim_s; otherwise it is a conflict (two processes claim one id) and dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import MeshConfig, suspicion_timeout
from .events import (
    Event,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberLoad,
    MemberSuspected,
    MemberUpdated,
)
from .members import MemberTable, Node
from .suspicion import Suspicion
from .timers import Timers
from .wire import Alive, Dead, MemberState, NodeState, Suspect

__all__ = ["Membership"]

ALIVE, SUSPECT, DEAD, LEFT = MemberState


class Membership:
    def __init__(self, config: MeshConfig, table: MemberTable, queue: BroadcastQueue,
                 awareness: Awareness, timers: Timers, stats: Counter[str], log: Any) -> None:
        self._cfg = config
        self.table = table
        self.local = table.local
        self._queue = queue
        self._awareness = awareness
        self._timers = timers
        self._stats = stats
        self._log = log
        self.suspicions: dict[str, Suspicion] = {}
        self.events: list[Event] = []
        self.leaving = False

    # ---- alive ---------------------------------------------------------------------------

    def on_alive(self, a: Alive, now: float) -> None:
        local = self.local
        if a.node == local.node_id and self.leaving:
            return  # never rejoin through an echo of our own old alive while leaving
        if len(a.meta) > self._cfg.meta_max_bytes:
            self._stats["drop.meta_too_large"] += 1
            return
        node = self.table.get(a.node)
        if node is None:
            node = Node(a.node, a.name, a.addr, a.meta, a.inc, ALIVE, now)
            self.table.add(node)
            self._queue.queue(a.node, a)
            self._log.info("member.join", node=a.node, name=a.name, incarnation=a.inc)
            self.events.append(MemberJoined(node.snapshot()))
            return
        moved = False
        if node.addr != a.addr:
            reclaim = self._cfg.dead_node_reclaim_s
            if node.state == LEFT or (node.state == DEAD and reclaim > 0
                                      and now - node.state_change > reclaim):
                moved = True
            else:
                self._conflict(node, a)
                return
        if node is local:
            if a.inc < node.inc:
                return
            if (a.inc == node.inc and a.meta == node.meta and a.name == node.name):
                return  # our own alive, echoed back
            self.refute(a.inc)
            self._log.warning("member.refute", about="alive", incarnation=a.inc)
            return
        if a.inc <= node.inc and not moved:
            return
        self.suspicions.pop(a.node, None)
        self._queue.queue(a.node, a)
        old_state = node.state
        changed = a.meta != node.meta or a.name != node.name or a.addr != node.addr
        node.inc, node.meta, node.name = a.inc, a.meta, a.name
        if moved:
            self.table.set_addr(node, a.addr)
        if old_state != ALIVE:
            self.table.set_state(node, ALIVE, now)
        match old_state:
            case MemberState.LEFT:
                self._log.info("member.join", node=a.node, name=a.name, incarnation=a.inc)
                self.events.append(MemberJoined(node.snapshot()))
                return
            case MemberState.DEAD | MemberState.SUSPECT:
                recovered = old_state == DEAD
                self._log.info("member.alive", node=a.node, incarnation=a.inc,
                               recovered=recovered)
                self.events.append(MemberAlive(node.snapshot(), recovered=recovered))
        if changed:
            self._log.info("member.update", node=a.node, incarnation=a.inc)
            self.events.append(MemberUpdated(node.snapshot()))

    def _conflict(self, node: Node, a: Alive) -> None:
        self._stats["addr_conflict"] += 1
        if not node.conflict_logged:  # one log line per member, not one per packet
            node.conflict_logged = True
            self._log.warning("member.conflict", node=node.node_id, known=node.addr,
                              claimed=a.addr, state=node.state.name)

    # ---- suspect -------------------------------------------------------------------------

    def on_suspect(self, s: Suspect, now: float) -> None:
        node = self.table.get(s.node)
        if node is None or s.inc < node.inc:
            return
        susp = self.suspicions.get(s.node)
        if susp is not None:
            # Already suspect: an independent confirmation shortens the timeout, and is
            # re-gossiped so that confirmations spread even to members that did not probe.
            if susp.confirm(s.src):
                self._queue.queue(s.node, s)
                # The prober plans the last-chance probe from the new deadline (probe.py).
                self._timers.at(now, "suspicion", (s.node, susp))
            return
        if node.state != ALIVE:
            return
        if node is self.local:
            self.refute(s.inc)
            self._log.warning("member.refute", about="suspect", accuser=s.src,
                              incarnation=s.inc)
            return
        self._queue.queue(s.node, s)
        node.inc = s.inc
        self.table.set_state(node, SUSPECT, now)
        n = len(self.table)
        k = self._cfg.suspicion_mult - 2
        if n - 2 < k:  # not enough other members to ever confirm: no shrinking
            k = 0
        min_s = suspicion_timeout(self._cfg.suspicion_mult, n, self._cfg.probe_interval_s)
        max_s = self._cfg.suspicion_max_timeout_mult * min_s
        susp = Suspicion(s.src, k, min_s, max_s, now)
        self.suspicions[s.node] = susp
        self._timers.at(now, "suspicion", (s.node, susp))
        self._log.info("member.suspect", node=s.node, incarnation=s.inc, accuser=s.src)
        self.events.append(MemberSuspected(node.snapshot()))

    def clear_suspicion(self, node_id: str, now: float) -> None:
        """First-hand evidence (its own ack) that a suspect member is alive: stop suspecting
        it. Its incarnation is kept: the refutation it gossips will bring the new one."""
        node = self.table.get(node_id)
        if node is None or node.state != SUSPECT:
            return
        self.suspicions.pop(node_id, None)
        self.table.set_state(node, ALIVE, now)
        self._stats["suspect.cleared_by_ack"] += 1
        self._log.info("member.alive", node=node_id, incarnation=node.inc, evidence="ack")
        self.events.append(MemberAlive(node.snapshot()))

    def declare_dead(self, node_id: str, now: float) -> None:
        """Our suspicion of ``node_id`` timed out (and its last-chance probe failed)."""
        node = self.table.get(node_id)
        susp = self.suspicions.get(node_id)
        if node is None or node.state != SUSPECT or susp is None:
            return
        self._log.info("member.suspect_timeout", node=node_id, incarnation=node.inc,
                       confirmations=susp.confirmations, after_s=round(now - susp.start, 3))
        self.on_dead(Dead(node.inc, node_id, self.local.node_id), now)

    # ---- dead / left ---------------------------------------------------------------------

    def on_dead(self, d: Dead, now: float) -> None:
        node = self.table.get(d.node)
        if node is None or d.inc < node.inc:
            return
        self.suspicions.pop(d.node, None)
        if node.dead_or_left:
            return
        if node is self.local and not self.leaving:
            self.refute(d.inc)
            self._log.warning("member.refute", about="dead", accuser=d.src, incarnation=d.inc)
            return
        self._queue.queue(d.node, d)
        node.inc = d.inc
        left = d.node == d.src
        self.table.set_state(node, LEFT if left else DEAD, now)
        if node is self.local:
            self._log.info("member.leave", node=d.node, incarnation=d.inc)
            return
        if left:
            self._log.info("member.left", node=d.node, incarnation=d.inc)
            self.events.append(MemberLeft(node.snapshot()))
        else:
            self._log.info("member.dead", node=d.node, incarnation=d.inc, by=d.src)
            self.events.append(MemberDead(node.snapshot()))

    # ---- refutation, push-pull, load -----------------------------------------------------

    def refute(self, accused_inc: int) -> None:
        """Raise our incarnation above the accused one and gossip that we are alive."""
        local = self.local
        local.inc = max(local.inc, accused_inc) + 1
        self._awareness.apply(1)
        self._stats["refute"] += 1
        self._queue.queue(local.node_id, self.local_alive())

    def local_alive(self) -> Alive:
        local = self.local
        return Alive(local.inc, local.node_id, local.name, local.addr, local.meta)

    def merge(self, states: Iterable[NodeState], now: float) -> None:
        """Merge a push-pull state. A member the peer believes dead is only suspected here:
        we give it the chance to refute rather than trusting one peer's verdict."""
        local, nodes = self.local, self.table.nodes
        for r in states:
            node = nodes.get(r.node)
            match r.state:
                case MemberState.ALIVE:
                    # Fast path: most entries of a push-pull are news to nobody.
                    if (node is None or node is local or r.inc > node.inc
                            or node.addr != r.addr):
                        self.on_alive(Alive(r.inc, r.node, r.name, r.addr, r.meta), now)
                case MemberState.LEFT:
                    self.on_dead(Dead(r.inc, r.node, r.node), now)
                case _:
                    self.on_suspect(Suspect(r.inc, r.node, local.node_id), now)
            if node is None or (r.inc, r.load_version) > node.load_key:
                self.update_load(r.node, r.inc, r.load, r.load_version)

    def update_load(self, node_id: str, inc: int, load: bytes, version: int) -> None:
        """Take a load report if it is newer, by (incarnation, load version), than ours."""
        node = self.table.get(node_id)
        if node is None or node is self.local or (inc, version) <= node.load_key:
            return
        if len(load) > self._cfg.load_max_bytes:
            self._stats["drop.load_too_large"] += 1
            return
        node.load_key = (inc, version)
        if load != node.load:
            node.load = load
            self.events.append(MemberLoad(node.snapshot()))
