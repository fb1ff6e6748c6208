"""Anti-entropy for the deployment table: pull a peer's table when its digest differs from ours.

Each node gossips `DeploymentTable.digest()` in its NodeMeta. `check()` is called every
`reconcile_interval_s` and on membership events with the alive peers; for each peer whose
digest differs it GETs the peer's `/internal/v1/deployments` (every entry, tombstones too)
and merges it last-writer-wins. The merge is commutative and idempotent, so this converges:
a peer that holds newer entries is pulled by us, and one that holds older entries sees our
new digest and pulls from us. A restarted node, whose table is empty, learns it from any peer.

One pull per peer at a time; the same (their digest, our digest) pair is not pulled again
within `retry_s`, so a peer that is behind is not hammered while it catches up.

`TableSync` is the mechanism for any table replicated this way (a digest in NodeMeta, a GET
of a node-to-node path, a commutative merge); `DeploymentSync` is its deployment instance. In
a signed cluster the pull goes to the peer's internal mTLS listener and `verify` checks that the
answering certificate is that peer's.
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

__all__ = ["INTERNAL_DEPLOYMENTS_PATH", "DeploymentSync", "Peer", "PeerVerify", "TableSync",
           "decode_entries", "encode_entries", "response_ssl_object"]

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
    """Base URL of the peer's node-to-node API: http://host:port (open cluster, its public
    port) or https://host:internal_port (signed cluster, mTLS)."""
    digest: str


PeerVerify = Callable[[ssl.SSLObject | None, str], None]
"""Called with the pull's TLS object and the peer's node id before its answer is read; raises
to refuse (a certificate that is not that node's, or revoked)."""


def response_ssl_object(resp: aiohttp.ClientResponse) -> ssl.SSLObject | None:
    """The TLS object of the connection that carried `resp` (None if not TLS). A small body
    may have released the connection to the pool already, so go through the protocol the
    response was read from."""
    protocol = resp.connection.protocol if resp.connection is not None else \
        getattr(resp, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    return transport.get_extra_info("ssl_object") if transport is not None else None


class TableSync:
    """Pulls `path` from each peer whose gossiped digest differs from `digest()`, and hands
    the body to `merge` (which returns the names of what changed). Reused by every replicated
    table: deployments, the revocation list, API keys."""

    def __init__(self, path: str, digest: Callable[[], str],
                 merge: Callable[[bytes], list[str]], on_change: Callable[[], None], *,
                 timeout_s: float = 5.0, retry_s: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None,
                 verify: PeerVerify | None = None, what: str = "table") -> None:
        self.path = path
        self._digest = digest
        self._merge = merge
        self._on_change = on_change
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry_s = retry_s
        self._ssl = ssl_context
        self._verify = verify
        self._what = what
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
        ours = self._digest()
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
                self._pull(peer), name=f"sync:{self._what}:{peer.node_id[:8]}")

    async def _pull(self, peer: Peer) -> None:
        try:
            assert self._session is not None
            async with self._session.get(peer.url + self.path) as resp:
                if self._verify is not None:
                    self._verify(response_ssl_object(resp), peer.node_id)
                resp.raise_for_status()
                data = await resp.read()
            changed = self._merge(data)
            self.pulls += 1
            if changed:
                log.info(f"{self._what}.merged", peer=peer.node_id[:12], changed=changed)
                self._on_change()
        except Exception as exc:  # noqa: BLE001 - any bad peer answer: log, retry later
            log.info(f"{self._what}.pull_failed", peer=peer.node_id[:12], url=peer.url,
                     error=repr(exc))
        finally:
            with contextlib.suppress(KeyError):
                del self._tasks[peer.node_id]


class DeploymentSync(TableSync):
    """The deployment table's sync (see the module docstring)."""

    def __init__(self, table: DeploymentTable, on_change: Callable[[], None], *,
                 timeout_s: float = 5.0, retry_s: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None,
                 verify: PeerVerify | None = None) -> None:
        self.table = table
        super().__init__(INTERNAL_DEPLOYMENTS_PATH, table.digest, self._merge_entries,
                         on_change, timeout_s=timeout_s, retry_s=retry_s,
                         ssl_context=ssl_context, verify=verify, what="deployments")

    def _merge_entries(self, data: bytes) -> list[str]:
        return [d.name for d in decode_entries(data) if self.table.merge(d)]
