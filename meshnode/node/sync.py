"""Anti-entropy for the deployment table: pull a peer's table when its digest differs from ours.

Each node gossips `DeploymentTable.digest()` in its NodeMeta. `check()` is called every
`reconcile_interval_s` and on membership events with the alive peers; for each peer whose
digest differs it GETs the peer's `/internal/v1/deployments` (every entry, tombstones too)
and merges it last-writer-wins. The merge is commutative and idempotent, so this converges:
a peer that holds newer entries is pulled by us, and one that holds older entries sees our
new digest and pulls from us. A restarted node, whose table is empty, learns it from any peer.

One pull per peer at a time; the same (their digest, our digest) pair is not pulled again
within `retry_s`, so a peer that is behind is not hammered while it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Self

import aiohttp
import msgspec
import structlog

from .deployments import Deployment, DeploymentTable

__all__ = ["INTERNAL_DEPLOYMENTS_PATH", "DeploymentSync", "Peer", "decode_entries",
           "encode_entries"]

log = structlog.get_logger("meshnode.node")

INTERNAL_DEPLOYMENTS_PATH = "/internal/v1/deployments"

_decoder = msgspec.msgpack.Decoder(list[Deployment])


def encode_entries(table: DeploymentTable) -> bytes:
    return msgspec.msgpack.encode(table.entries())


def decode_entries(data: bytes) -> list[Deployment]:
    return _decoder.decode(data)


class Peer(msgspec.Struct, frozen=True):
    node_id: str
    url: str
    """http://host:port of the peer's API."""
    digest: str


class DeploymentSync:
    def __init__(self, table: DeploymentTable, on_change: Callable[[], None], *,
                 timeout_s: float = 5.0, retry_s: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.table = table
        self._on_change = on_change
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry_s = retry_s
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last: dict[str, tuple[str, str, float]] = {}
        self.pulls = 0

    async def __aenter__(self) -> Self:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel pulls in flight and close the session; safe to call twice."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def check(self, peers: Iterable[Peer]) -> None:
        """Start a pull from each peer whose digest differs from ours (never blocks)."""
        if self._session is None:
            return
        ours = self.table.digest()
        now = time.monotonic()
        for peer in peers:
            if not peer.digest or peer.digest == ours or peer.node_id in self._tasks:
                continue
            last = self._last.get(peer.node_id)
            if last is not None and last[:2] == (peer.digest, ours) and \
                    now - last[2] < self._retry_s:
                continue
            self._last[peer.node_id] = (peer.digest, ours, now)
            self._tasks[peer.node_id] = asyncio.create_task(
                self._pull(peer), name=f"sync:{peer.node_id[:8]}")

    async def _pull(self, peer: Peer) -> None:
        try:
            assert self._session is not None
            async with self._session.get(peer.url + INTERNAL_DEPLOYMENTS_PATH) as resp:
                resp.raise_for_status()
                entries = decode_entries(await resp.read())
            changed = [d.name for d in entries if self.table.merge(d)]
            self.pulls += 1
            if changed:
                log.info("deployments.merged", peer=peer.node_id[:12], changed=changed,
                         digest=self.table.digest())
                self._on_change()
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError,
                msgspec.ValidationError) as exc:
            log.info("deployments.pull_failed", peer=peer.node_id[:12], url=peer.url,
                     error=repr(exc))
        finally:
            with contextlib.suppress(KeyError):
                del self._tasks[peer.node_id]
