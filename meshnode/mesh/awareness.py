"""Lifeguard local health awareness ("LHA").

A node that misses acks because *it* is slow (CPU starved, GC pause, saturated NIC) would
otherwise accuse healthy peers. It keeps a score in [0, max - 1]: a failed probe without the
expected nacks, or having to refute a suspicion of itself, raises it; a successful probe lowers
it. Probe intervals (and so the time left for indirect acks) are multiplied by score + 1.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        self.score = 0  # invariant: 0 <= score <= max_multiplier - 1

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self._max - 1)

    def scale(self, timeout_s: float) -> float:
        """timeout * (score + 1): at most awareness_max_multiplier times the base."""
        return timeout_s * (self.score + 1)
