"""Transmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Each update is handed out at most ``retransmit_mult * ceil(log10(n + 1))`` times (n = members
now), then dropped: with a fan-out of gossip_nodes per round this reaches every node with high
probability while keeping per-update cost O(n log n) cluster-wide. Updates that have been sent
the fewest times go first, newest first among equals, so fresh news overtakes old. At most one
update per member is queued: a newer update about a member replaces the older one.
"""

from __future__ import annotations

from .config import retransmit_limit
from .wire import Msg, encode_msg

__all__ = ["BroadcastQueue"]

_MIN_MSG_BYTES = 8  # no message encodes smaller: stop filling a packet below this


class _Item:
    __slots__ = ("id", "key", "msg", "size", "transmits")

    def __init__(self, key: str, msg: Msg, size: int, id_: int) -> None:
        self.key = key
        self.msg = msg
        self.size = size
        self.transmits = 0
        self.id = id_


class BroadcastQueue:
    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._items: dict[str, _Item] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, msg: Msg) -> None:
        """Queue ``msg`` about member ``key``, replacing any older update about it."""
        self._items.pop(key, None)
        self._next_id += 1
        self._items[key] = _Item(key, msg, len(encode_msg(msg)), self._next_id)

    def pending(self, key: str) -> bool:
        return key in self._items

    def get(self, budget: int, n: int, max_count: int) -> list[Msg]:
        """Up to ``max_count`` messages whose encoded sizes add up to at most ``budget`` bytes;
        each handed out counts as one transmission."""
        if not self._items or budget < _MIN_MSG_BYTES or max_count <= 0:
            return []
        limit = retransmit_limit(self._mult, n)
        taken: list[_Item] = []
        for item in sorted(self._items.values(), key=lambda i: (i.transmits, -i.id)):
            if item.size <= budget:
                taken.append(item)
                budget -= item.size
                if budget < _MIN_MSG_BYTES or len(taken) >= max_count:
                    break
        for item in taken:
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
        return [item.msg for item in taken]

    def clear(self) -> None:
        self._items.clear()
