"""Stop-sequence matching over a stream of text pieces.

Invariant: text is released only once no stop sequence can begin inside it, so a stop that
spans several tokens is never partly sent. The held-back tail is at most
max(len(stop)) - 1 characters.
"""

from __future__ import annotations

__all__ = ["StopMatcher"]


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to send, whether a stop sequence was reached)."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        hit = min((i for s in self._stops if (i := pending.find(s)) >= 0), default=-1)
        if hit >= 0:
            self._pending = ""
            return pending[:hit], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        self._pending = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold], False

    def finish(self, last: str) -> tuple[str, bool]:
        """Feed the decoder's last text once generation ended; return everything still to
        send (the held-back tail too, unless a stop sequence completed) and whether it did."""
        text, hit = self.feed(last)
        return (text, True) if hit else (text + self.flush(), False)

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop sequence."""
        text, self._pending = self._pending, ""
        return text
