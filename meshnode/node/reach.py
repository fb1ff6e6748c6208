"""Peers this node cannot connect to, though membership says they are alive.

Membership tells whether a node is alive, not whether this node can reach it. In a one-way
partition (a bad cable or switch port, a firewall rule on one side) the other members still
reach the peer and vouch for it through indirect probes, so it stays alive and keeps its
replicas, and every request this node routes there would wait for the connect timeout (5 s)
before trying the next replica. So the forwarder reports a connect that failed (`failed`);
routing then leaves that peer out (`skip`, unless that leaves no target), and a background task
tries a connection to it (TCP, with TLS in a signed cluster) after PROBE_FIRST_S, then twice as
long each time up to PROBE_MAX_S, and lets it back in at the first that succeeds. No user
request pays the timeout twice in a row. A peer that is declared dead or leaves is forgotten
(`forget`); one that comes back at another address is not skipped.

Membership can see such a path before any request does: a member that does not answer this
node's ping but answers the ping-req of another member is alive but maybe out of our reach
(mesh's MemberIndirect). `check` then tries a connection there in the background, and a failed
try counts like a failed connect: the first request after it already goes elsewhere. A try
that connects changes nothing (UDP loss alone makes probes go indirect now and then). A check
opens CHECK_ATTEMPTS connections at once and waits CHECK_TIMEOUT_S: on a lossy LAN that is
both sooner and surer than one connection given PROBE_TIMEOUT_S (see CHECK_TIMEOUT_S).

Requests already sent there when the peer is found unreachable (by a failed connect or a
failed check) and still without any answer are moved too: `on_down` tells the forwarding pool,
which aborts them, and each is tried on its next replica (Upstream.drop_unanswered) instead of
waiting for the unacknowledged-data timeout (10 s) or keepalive (20-30 s); answers from there
that then stall are cut off (upstream_lost) instead of waiting for keepalive.

The view is this node's alone, so two nodes may route the same prefix differently while one
of them cannot reach its owner: the request is served elsewhere (a spill: the prefix does not
move) instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

__all__ = ["CHECK_ATTEMPTS", "CHECK_TIMEOUT_S", "PROBE_FIRST_S", "PROBE_MAX_S", "PROBE_TIMEOUT_S",
           "Reachability", "connects"]

log = structlog.get_logger("meshnode.node")

PROBE_FIRST_S = 1.0
"""Seconds from a failed connect to the first background try."""
PROBE_MAX_S = 15.0
"""Most seconds between two tries (they double from PROBE_FIRST_S): how long a peer that became
reachable again may stay skipped, against one connect attempt per peer per interval."""
PROBE_TIMEOUT_S = 5.0
"""How long one try waits for the connection (and TLS handshake), as forwarding does."""
CHECK_TIMEOUT_S = 2.0
"""How long a check (after membership's hint) waits for any of its CHECK_ATTEMPTS connections.
Linux resends a lost SYN after 1 s, then 3 s: in 2 s each connection has two chances, so a
check fails on a path that works only if 2 x CHECK_ATTEMPTS exchanges are lost (20% loss each
way: 0.36^6 = 0.2%; one connection in PROBE_TIMEOUT_S has three chances: 4.7%). Lower finds a
broken path sooner; a failed check moves the peer's unanswered requests elsewhere."""
CHECK_ATTEMPTS = 3
"""Connections a check opens at once; the first that opens ends it."""


class _Target(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def url(self) -> str: ...


_T = TypeVar("_T", bound=_Target)


class Reachability:
    """Peers whose node-to-node URL this node failed to connect to (see the module docstring).
    Closing it (`close`, twice is safe) cancels its background tries."""

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None, *,
                 on_down: Callable[[str], object] = lambda url: None,
                 first_s: float = PROBE_FIRST_S, max_s: float = PROBE_MAX_S,
                 timeout_s: float = PROBE_TIMEOUT_S,
                 check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.down: dict[str, str] = {}
        """Node id -> the URL a connect to it failed at, until a try there succeeds."""
        self._ssl = ssl_context
        self._on_down = on_down
        """Called with the URL each time a peer becomes unreachable there."""
        self._first_s, self._max_s, self._timeout_s = first_s, max_s, timeout_s
        self._check_timeout_s = check_timeout_s
        self._tries: dict[str, asyncio.Task[None]] = {}
        self._checks: dict[str, asyncio.Task[None]] = {}

    def failed(self, node_id: str, name: str, url: str) -> None:
        """A connect to node `node_id` (called `name`) at `url` failed: skip it from now on
        and start trying it in the background (needs a running loop)."""
        if self.down.get(node_id) == url:
            return
        self.forget(node_id)
        self.down[node_id] = url
        log.warning("peer.unreachable", node=name, url=url,
                    hint="membership says it is alive: requests go to other replicas until a "
                         "connection succeeds; check the network between the two machines")
        self._tries[node_id] = asyncio.get_running_loop().create_task(
            self._retry(node_id, name, url), name=f"reach:{name}")
        self._on_down(url)

    def check(self, node_id: str, name: str, url: str) -> None:
        """Membership hints that node `node_id` may be out of reach: try a connection to `url`
        in the background (one at a time per node, none while it is known down there) and
        treat a failure as `failed` (needs a running loop)."""
        if self.down.get(node_id) == url or node_id in self._checks:
            return
        self._checks[node_id] = asyncio.get_running_loop().create_task(
            self._check(node_id, name, url), name=f"reach-check:{name}")

    async def _check(self, node_id: str, name: str, url: str) -> None:
        try:
            ok = await connects(url, self._ssl(), self._check_timeout_s, CHECK_ATTEMPTS)
        finally:
            self._checks.pop(node_id, None)
        if not ok:
            self.failed(node_id, name, url)

    def skip(self, targets: list[_T]) -> list[_T]:
        """`targets` (in order) without the peers known unreachable at their URL, or all of
        them when none would remain (the last one is then tried anyway)."""
        down = self.down
        if not down:
            return targets
        kept = [t for t in targets if down.get(t.node_id) != t.url]
        return kept or targets

    def forget(self, node_id: str) -> None:
        """Node `node_id` was declared dead or left: stop skipping and trying it."""
        self.down.pop(node_id, None)
        for tasks in (self._tries, self._checks):
            task = tasks.pop(node_id, None)
            if task is not None:
                task.cancel()

    def close(self) -> None:
        """Cancel every background try; the view empties."""
        for node_id in {*self._tries, *self._checks}:
            self.forget(node_id)
        self.down.clear()

    async def _retry(self, node_id: str, name: str, url: str) -> None:
        delay, tries = self._first_s, 0
        while True:
            await asyncio.sleep(delay)
            tries += 1
            if await connects(url, self._ssl(), self._timeout_s):
                break
            delay = min(delay * 2, self._max_s)
        if self.down.get(node_id) == url:
            del self.down[node_id]
        self._tries.pop(node_id, None)
        log.info("peer.reachable", node=name, url=url, tries=tries)


async def connects(url: str, ssl_context: ssl.SSLContext | None, timeout_s: float,
                   attempts: int = 1) -> bool:
    """Whether a connection to `url` (http://host:port, or https:// with `ssl_context`) opens,
    handshake included, within `timeout_s`; `attempts` connections are tried at once, and the
    first that opens ends the others. Each is closed at once."""
    tries = [asyncio.ensure_future(_connect_once(url, ssl_context, timeout_s))
             for _ in range(attempts)]
    try:
        for done in asyncio.as_completed(tries):
            if await done:
                return True
        return False
    finally:
        for t in tries:
            t.cancel()
        await asyncio.gather(*tries, return_exceptions=True)


async def _connect_once(url: str, ssl_context: ssl.SSLContext | None, timeout_s: float) -> bool:
    scheme, _, hostport = url.partition("://")
    host, _, port = hostport.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), ssl=ssl_context if scheme == "https" else None)
    except (OSError, TimeoutError, ssl.SSLError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(timeout_s):
            await writer.wait_closed()
    return True

