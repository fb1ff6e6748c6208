"""Deadline heap of the sans-I/O core: the core is told the time, and says when it next wants
to be woken (``next_deadline``). Cancelled timers are not removed: their handler finds its
guard no longer true and does nothing (so an early wake-up is harmless)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any

__all__ = ["Timers"]


class Timers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0  # ties fire in the order they were set

    def at(self, when: float, kind: str, arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, arg))

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def due(self, now: float) -> Iterator[tuple[str, Any]]:
        """Pop and yield every timer due at ``now``, including ones set while iterating."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, arg = heapq.heappop(heap)
            yield kind, arg
