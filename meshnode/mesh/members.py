"""The member table: who we know, in which state, and in which order we probe them.

Invariants:
- the local node is always in the table, and only the local node raises its own incarnation;
- ``order`` holds exactly the ids of ``nodes``; probing walks it round-robin and reshuffles it
  at each wrap, so every member is probed once per round in a fresh random order (SWIM 4.3);
- dead and left members stay as tombstones (so stale gossip cannot resurrect them) until
  ``reap`` forgets them ``reap_after_s`` after their last state change.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from .wire import Addr, MemberState, NodeState

__all__ = ["Member", "MemberState", "MemberTable", "Node"]


class Member(msgspec.Struct, frozen=True):
    """A snapshot of one member, as the core saw it when the snapshot was taken."""

    node_id: str
    name: str
    addr: Addr
    meta: bytes
    load: bytes
    state: MemberState
    incarnation: int
    state_change: float
    """Core-clock time (seconds) of the last change of ``state``."""


class Node:
    """Mutable record of one member, owned by the core (never handed out: see ``snapshot``)."""

    __slots__ = (
        "addr",
        "conflict_logged",
        "inc",
        "load",
        "load_key",
        "meta",
        "name",
        "node_id",
        "state",
        "state_change",
    )

    def __init__(self, node_id: str, name: str, addr: Addr, meta: bytes, inc: int,
                 state: MemberState, now: float) -> None:
        self.node_id = node_id
        self.name = name
        self.addr = addr
        self.meta = meta
        self.inc = inc
        self.state = state
        self.state_change = now
        self.load = b""
        # Order of load reports: (incarnation of the reporter, its load version).
        self.load_key: tuple[int, int] = (0, 0)
        self.conflict_logged = False

    @property
    def dead_or_left(self) -> bool:
        return self.state >= MemberState.DEAD

    def snapshot(self) -> Member:
        return Member(self.node_id, self.name, self.addr, self.meta, self.load, self.state,
                      self.inc, self.state_change)

    def to_wire(self) -> NodeState:
        return NodeState(self.node_id, self.name, self.addr, self.meta, self.inc, self.state,
                         self.load, self.load_key[1])


class MemberTable:
    def __init__(self, rng: random.Random, local: Node) -> None:
        self._rng = rng
        self.local = local
        self.nodes: dict[str, Node] = {local.node_id: local}
        self.order: list[str] = [local.node_id]
        self._probe_index = 0
        self._tombstones: set[str] = set()
        # Address -> id of the member last seen there (a restarted node may reuse an address
        # under a new id while the old id is a tombstone).
        self.by_addr: dict[Addr, str] = {local.addr: local.node_id}

    def __len__(self) -> int:
        return len(self.nodes)

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def add(self, node: Node) -> None:
        """Insert at a random place of the probe order, so a new member is not always probed
        last (memberlist does the same)."""
        self.nodes[node.node_id] = node
        self.by_addr[node.addr] = node.node_id
        self.order.append(node.node_id)
        i = self._rng.randrange(len(self.order))
        self.order[i], self.order[-1] = self.order[-1], self.order[i]
        if node.dead_or_left:
            self._tombstones.add(node.node_id)

    def add_many(self, nodes: list[Node]) -> None:
        """Insert several members and reshuffle the whole probe order once."""
        for node in nodes:
            self.nodes[node.node_id] = node
            self.by_addr[node.addr] = node.node_id
            self.order.append(node.node_id)
            if node.dead_or_left:
                self._tombstones.add(node.node_id)
        self._rng.shuffle(self.order)

    def set_addr(self, node: Node, addr: Addr) -> None:
        if self.by_addr.get(node.addr) == node.node_id:
            del self.by_addr[node.addr]
        node.addr = addr
        self.by_addr[addr] = node.node_id

    def set_state(self, node: Node, state: MemberState, now: float) -> None:
        """Every state change goes through here, to keep the tombstone index exact."""
        node.state = state
        node.state_change = now
        if node.dead_or_left:
            self._tombstones.add(node.node_id)
        else:
            self._tombstones.discard(node.node_id)

    def dead(self) -> list[Node]:
        """Members in state dead (not left), in table order."""
        return [n for n in self.nodes.values() if n.state == MemberState.DEAD] \
            if self._tombstones else []

    def next_probe_target(self) -> Node | None:
        """Next member to probe, round-robin; None if there is no live member but us."""
        checked = 0
        while checked <= len(self.order):
            if self._probe_index >= len(self.order):
                self._rng.shuffle(self.order)
                self._probe_index = 0
                checked += 1
                continue
            node = self.nodes[self.order[self._probe_index]]
            self._probe_index += 1
            if node is self.local or node.dead_or_left:
                checked += 1
                continue
            return node
        return None

    def random_nodes(self, k: int, skip: Callable[[Node], bool]) -> list[Node]:
        """Up to k distinct random members for which ``skip`` is false, in at most 3n draws
        (memberlist's kRandomNodes): O(k) when most members qualify, as they do normally."""
        order, nodes, found = self.order, self.nodes, list[Node]()
        n = len(order)
        for _ in range(3 * n):
            if len(found) >= k:
                break
            node = nodes[order[self._rng.randrange(n)]]
            if skip(node) or node in found:
                continue
            found.append(node)
        return found

    def reap(self, now: float, after_s: float) -> list[Node]:
        """Forget dead and left members whose state is older than ``after_s``."""
        gone = [self.nodes[i] for i in self._tombstones
                if now - self.nodes[i].state_change >= after_s]
        for node in gone:
            self._tombstones.discard(node.node_id)
            del self.nodes[node.node_id]
            if self.by_addr.get(node.addr) == node.node_id:
                del self.by_addr[node.addr]
            i = self.order.index(node.node_id)
            del self.order[i]
            if i < self._probe_index:
                self._probe_index -= 1
        return gone
