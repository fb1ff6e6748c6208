"""mDNS discovery (zeroconf): announce this node and find others on the LAN.

A record found by mDNS is only a hint of where to try a join: it is never trusted for
membership (that is gossip's job, over authenticated channels), and a crashed node is never
removed because its record lingers (PTR TTLs run to minutes). Service `_meshnode._tcp.local.`,
TXT record kept small: cluster id, node id, gossip and HTTP ports, protocol version.

mDNS runs only on the interfaces the node is bound to: a node bound to loopback never
multicasts on the machine's other interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import socket
from collections.abc import Callable

import msgspec
import structlog
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["Discovery", "Found", "SERVICE_TYPE"]

log = structlog.get_logger("meshnode.mesh")

SERVICE_TYPE = "_meshnode._tcp.local."
TXT_VERSION = "1"


class Found(msgspec.Struct, frozen=True):
    """Another node's announcement: where to try a join."""

    node_id: str
    cluster: str
    host: str
    gossip_port: int
    http_port: int
    protocol: int


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class Discovery:
    """Async context manager: registers our record, browses for others, calls `on_found`.

    `on_found` is called on the event loop for every valid record of our cluster that is not
    ours (again on each re-announce), and must not block.
    """

    def __init__(self, *, node_id: str, cluster: str, bind_ip: str, gossip_port: int,
                 http_port: int, protocol: int, on_found: Callable[[Found], None],
                 reannounce_s: float = 60.0) -> None:
        if ipaddress.ip_address(bind_ip).is_unspecified:
            raise ValueError("mDNS needs a concrete interface address, not 0.0.0.0")
        self.node_id = node_id
        self.cluster = cluster
        self.bind_ip = bind_ip
        self.gossip_port = gossip_port
        self.http_port = http_port
        self.protocol = protocol
        self.on_found = on_found
        self.reannounce_s = reannounce_s
        self.stats: dict[str, int] = {}
        self._state = _State.NEW
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Discovery":
        if self._state is not _State.NEW:
            return self
        self._zc = AsyncZeroconf(interfaces=[self.bind_ip], ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, f"{self.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.bind_ip)], port=self.gossip_port,
            server=f"meshnode-{self.node_id}.local.",
            properties={"v": TXT_VERSION, "c": self.cluster, "n": self.node_id,
                        "g": str(self.gossip_port), "h": str(self.http_port),
                        "p": str(self.protocol)})
        # Browse before registering: registration takes ~2 s of probing, and announcements
        # received meanwhile would sit in the cache, suppressed later as known answers.
        self._state = _State.RUNNING
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE],
                                            handlers=[self._on_change])
        await self._zc.async_register_service(self._info)
        self._spawn(self._reannounce())
        log.info("discovery.started", ip=self.bind_ip, node=self.node_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Unregister and stop browsing; safe to call twice."""
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_all_services()
            await self._zc.async_close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reannounce(self) -> None:
        while True:
            await asyncio.sleep(self.reannounce_s)
            if self._zc is not None and self._info is not None:
                await self._zc.async_update_service(self._info)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated) \
                and self._state is _State.RUNNING:
            self._spawn(self._resolve(service_type, name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            self._count("unresolved")
            return
        found = self.parse(info)
        if found is None:
            self._count("invalid")
        elif found.node_id == self.node_id:
            self._count("self")
        elif found.cluster != self.cluster:
            self._count("other_cluster")
        else:
            self._count("found")
            self.on_found(found)

    @staticmethod
    def parse(info: AsyncServiceInfo) -> Found | None:
        """A Found from a resolved record, or None if anything in it is malformed."""
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in (info.properties or {}).items() if isinstance(k, bytes)}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        try:
            found = Found(node_id=props["n"], cluster=props["c"], host=addresses[0],
                          gossip_port=int(props["g"]), http_port=int(props["h"]),
                          protocol=int(props["p"]))
        except (KeyError, IndexError, ValueError):
            return None
        ip = ipaddress.ip_address(found.host)
        if not (0 < found.gossip_port < 65536 and 0 < found.http_port < 65536) \
                or ip.is_unspecified or ip.is_multicast:
            return None
        return found

    def _count(self, reason: str) -> None:
        self.stats[reason] = self.stats.get(reason, 0) + 1
