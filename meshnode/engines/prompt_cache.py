"""A replica's saved KV states, keyed by the tokens they hold: a multi-prefix prompt cache.

A llama.cpp context holds one token sequence at a time. A replica that serves several system
prompts (several apps) or several conversations would re-evaluate each one whenever another
ran in between. This cache keeps the context's state after each request, so a later prompt
restores the saved state sharing its longest prefix instead (as llama.cpp's server slots and
vLLM's prefix caching keep several prefixes warm).

The cache knows nothing of llama.cpp: a state is an opaque buffer with a size in bytes.

Invariants:
- the sum of the entries' sizes never exceeds `budget_bytes`; the least recently used entries
  are evicted first to make room, and a state larger than the whole budget is not kept;
- no entry's tokens are a prefix of another entry's tokens: saving a sequence drops the entries
  it extends, and saving a prefix of an entry only refreshes that entry (it covers the prefix);
- a lookup uses at most `len(prompt) - 1` tokens: the prompt's last token is always evaluated,
  since a restored state carries no logits to sample from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIB", "CachedState", "PromptCache", "common_prefix"]

MIB = 1024 * 1024


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class CachedState:
    tokens: tuple[int, ...]
    """The tokens whose keys and values the state holds, in position order."""
    state: object
    """The engine's opaque state (for llama.cpp, a ctypes byte array of one sequence)."""
    size: int
    """Bytes the state takes; what the budget counts."""


class PromptCache:
    """Saved states by token sequence, longest-common-prefix lookup, LRU eviction by bytes.

    Not thread-safe: the engine calls it from its one generation thread."""

    def __init__(self, budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise TypeError(f"budget_bytes must be an int, not {type(budget_bytes).__name__}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (0 disables the cache), "
                             f"not {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], CachedState] = OrderedDict()  # LRU first
        self._used = 0

    @classmethod
    def from_mb(cls, budget_mb: int) -> PromptCache:
        """A cache of `budget_mb` MiB (0 disables it)."""
        if isinstance(budget_mb, bool) or not isinstance(budget_mb, int) or budget_mb < 0:
            raise ValueError(f"prompt cache budget must be a whole number of MiB >= 0 "
                             f"(0 disables it), not {budget_mb!r}")
        return cls(budget_mb * MIB)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether some entry holds `tokens` or extends them (saving them would add nothing);
        such an entry becomes the most recently used. Lets the engine skip copying a state."""
        key, n = tuple(tokens), len(tokens)
        for old in reversed(self._entries):
            if len(old) >= n and old[:n] == key:
                self._entries.move_to_end(old)
                return True
        return False

    def lookup(self, prompt: Sequence[int], better_than: int = 0) -> tuple[CachedState, int] | None:
        """The entry sharing the longest usable prefix with `prompt`, and that prefix's length,
        if it is longer than `better_than` tokens (what the live context already offers).
        Usable = at most len(prompt) - 1 tokens. Ties go to the most recently used entry.
        A hit becomes the most recently used entry."""
        limit = len(prompt) - 1
        best: CachedState | None = None
        best_n = better_than
        for entry in reversed(self._entries.values()):  # most recent first: ties keep it
            n = min(common_prefix(entry.tokens, prompt), limit)
            if n > best_n:
                best, best_n = entry, n
        if best is None:
            return None
        self._entries.move_to_end(best.tokens)
        return best, best_n

    def save(self, tokens: Sequence[int], state: object, size: int) -> bool:
        """Keep `state` (holding `tokens`) as the most recently used entry; True if kept.

        Entries whose tokens are a prefix of `tokens` are dropped (the new one covers them).
        If an entry already extends `tokens` (or equals it), that entry is refreshed instead.
        Not kept: empty tokens, a disabled cache, a state larger than the budget."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a number of bytes >= 0, not {size!r}")
        key = tuple(tokens)
        if not key or not self.enabled or size > self.budget_bytes:
            return False
        if self.covers(key):
            return False
        n = len(key)
        for old in [k for k in self._entries if len(k) < n and key[:len(k)] == k]:
            self._drop(old)
        while self._entries and self._used + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = CachedState(key, state, size)
        self._used += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self._used -= self._entries.pop(key).size
