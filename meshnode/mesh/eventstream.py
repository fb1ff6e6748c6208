"""EventStream: one consumer's queue of membership events (``Mesh.events()``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Self

from .events import Event

__all__ = ["EventStream"]


class EventStream:
    """An async iterator over events, fed from the moment it is created (so no event between
    creating it and iterating it is missed) until ``end()``. Holds at most ``max_events``: a
    consumer that falls behind loses the oldest, counted in ``stats["events.dropped"]``."""

    def __init__(self, max_events: int, stats: Counter[str], *, closed: bool = False) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(max_events)
        self._stats = stats
        self._ended = closed

    def put(self, event: Event | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._stats["events.dropped"] += 1
        self._queue.put_nowait(event)

    def end(self) -> None:
        self.put(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._ended = True
            raise StopAsyncIteration
        return event
