"""Lifeguard suspicion timer ("LHA-Suspicion").

A suspicion starts at ``max_s`` and shrinks towards ``min_s`` as k independent members confirm
it (a confirmation from a member already counted, or beyond k, changes nothing):

    timeout(c) = max(min_s, max_s - (max_s - min_s) * log(c + 1) / log(k + 1))

with c confirmations, min_s = suspicion_mult * max(1, log10 n) * probe_interval,
max_s = suspicion_max_timeout_mult * min_s, k = suspicion_mult - 2 (0 when fewer than k other
members could confirm, in which case the timeout is min_s at once). A healthy node therefore
has up to max_s to refute a lone accuser, while a really failed node is declared dead after
about min_s once several members agree.

Two additions to memberlist, both to keep a healthy member from being declared dead, and
both free for a healthy node detecting a real failure (see probe.py): the timeout is stretched
by the local health multiplier (an unhealthy node, which is likely the one with the problem,
waits longer before it accuses; a healthy one has h = 0), and the member gets one last probe
during the final probe period of the timeout; if that fails it is declared dead at the
deadline, as memberlist would declare it.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "suspicion_remaining"]


def suspicion_remaining(c: int, k: int, min_s: float, max_s: float) -> float:
    """Timeout (seconds from the start of the suspicion) after c confirmations out of k."""
    if k < 1:
        return min_s
    frac = math.log(c + 1) / math.log(k + 1)
    return max(min_s, max_s - (max_s - min_s) * frac)


class Suspicion:
    __slots__ = (
        "_confirmers",
        "_k",
        "_max",
        "_min",
        "checking",
        "confirmations",
        "deadline",
        "failed_check_at",
        "start",
    )

    def __init__(self, src: str, k: int, min_s: float, max_s: float, start: float) -> None:
        # The accuser is recorded so that it cannot also count as a confirmation.
        self._confirmers = {src}
        self._k = k
        self._min = min_s
        self._max = max_s
        self.start = start
        self.confirmations = 0
        self.deadline = start + suspicion_remaining(0, k, min_s, max_s)
        # The last-chance probe (probe.py): whether one is in flight, and when the last one
        # ended without an answer (None: none has).
        self.checking = False
        self.failed_check_at: float | None = None

    def confirm(self, src: str) -> bool:
        """Count an independent confirmation; True if it was new (so worth re-gossiping)."""
        if self.confirmations >= self._k or src in self._confirmers:
            return False
        self._confirmers.add(src)
        self.confirmations += 1
        self.deadline = self.start + suspicion_remaining(
            self.confirmations, self._k, self._min, self._max)
        return True

    def due(self, stretch: float) -> float:
        """The deadline with the timeout multiplied by ``stretch`` (local health)."""
        return self.start + (self.deadline - self.start) * stretch

    def earliest_due(self, stretch: float) -> float:
        """The soonest ``due`` can become, once every confirmation is in (the minimum)."""
        return self.start + self._min * stretch
