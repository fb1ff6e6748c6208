"""Replicas that moved off this node, finishing what they serve before they close.

A replica moves when placement stops choosing this node for it (a drain, a node that came
back, a re-pin, a scale-down): once every new holder is ready the reconciler takes it out of
the node's replicas and of its gossip, so no node routes to it any more, and hands it here.
It still takes what a peer sends it for LINGER_S (a peer that has not heard yet), and closes
once the requests it is serving are done, at most `grace_s` after it moved: closing it at
once would cut the streams it serves. Should placement choose this node again meanwhile, the
node takes it back as it is (`take_back`), without loading the model again.
"""

from __future__ import annotations

import asyncio

import structlog

from .deployments import Deployment
from .replicas import Replica

__all__ = ["LINGER_S", "Retiring"]

log = structlog.get_logger("meshnode.node")

LINGER_S = 1.0
"""How long a replica that moved still takes what peers send it: the requests of a peer that
has not yet heard it moved (gossip spreads it within a probe round or two)."""


class Retiring:
    """The replicas that moved off this node and are not closed yet, by deployment name.
    `close` (twice is safe) closes them at once."""

    def __init__(self, grace_s: float) -> None:
        self._grace_s = grace_s
        self._moved: dict[str, Replica] = {}
        self._tasks: dict[asyncio.Task[None], Replica] = {}

    def add(self, replica: Replica) -> None:
        """`replica` moved: close it once it is done (see the module docstring)."""
        name = replica.deployment.name
        self._moved[name] = replica
        task = asyncio.create_task(self._retire(name, replica), name=f"retire:{name}")
        self._tasks[task] = replica
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def get(self, name: str) -> Replica | None:
        """The replica of deployment `name` that moved and still runs, if any."""
        return self._moved.get(name)

    def take_back(self, d: Deployment) -> Replica | None:
        """Placement chose this node for `d` again: its replica that moved, ready and running
        what `d` runs, no longer retiring; None if there is none."""
        replica = self._moved.get(d.name)
        if replica is None or replica.outdated(d) or replica.state != "ready":
            return None
        del self._moved[d.name]
        log.info("replica.reclaimed", model=d.name)
        return replica

    async def close(self) -> None:
        """Close every replica still retiring (a retire cancelled in the middle of closing its
        replica included: Replica.close is safe twice)."""
        tasks = dict(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in tasks.values()), return_exceptions=True)
        self._moved.clear()

    async def _retire(self, name: str, replica: Replica) -> None:
        try:
            async with asyncio.timeout(self._grace_s):
                await asyncio.sleep(LINGER_S)
                while replica.in_flight and self._moved.get(name) is replica:
                    await asyncio.sleep(0.1)
        except TimeoutError:
            log.warning("replica.retire_timeout", model=name, in_flight=replica.in_flight)
        finally:
            if self._moved.get(name) is replica:  # not taken back
                del self._moved[name]
                await replica.close()
