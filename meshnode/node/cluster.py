"""This node's place in the mesh: membership (SWIM), discovery (mDNS), and what it gossips.

The node gossips a small `NodeMeta` (name, HTTP address, capacity, engines, replicas with
their state) through the mesh delegate; a change raises its incarnation, so it is checked
once a second rather than on every replica event. Load (in-flight requests) rides on acks
and push-pull without raising the incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable, Container, Iterable
from typing import Self

import msgspec
import structlog

from meshnode.mesh import PROTOCOL_VERSION, Member, MemberState, Mesh, MeshConfig
from meshnode.mesh.discovery import Discovery, Found
from meshnode.mesh.gossip_keys import GossipKeys

from .config import DEFAULT_GOSSIP_PORT, NodeConfig, host_port
from .security import ClusterSecurity

__all__ = ["Cluster", "MemberView", "NodeLoad", "NodeMeta", "node_load"]

log = structlog.get_logger("meshnode.node")


class NodeMeta(msgspec.Struct, frozen=True, array_like=True):
    """Gossiped in alive messages (<= 1 KB). ONLY APPEND fields, each with a default."""

    name: str
    http_host: str
    http_port: int
    ram_mb: int = 0
    gpus: int = 0
    engines: tuple[str, ...] = ()
    replicas: tuple[tuple[str, str], ...] = ()
    """(deployment name, replica state) for each replica this node runs."""
    version: str = ""
    deployments_digest: str = ""
    """DeploymentTable.digest() of this node: a peer whose digest differs pulls our table."""
    internal_port: int = 0
    """Port of the node-to-node mTLS listener of a signed cluster (0: open cluster)."""
    revocation_seq: int = 0
    """Sequence of the revocation list this node holds: a peer holding a lower one pulls it."""
    keys_digest: str = ""
    """KeyTable.digest() of this node: a peer whose digest differs pulls our API keys."""
    prefixes: tuple[tuple[str, bytes], ...] = ()
    """(deployment name, sorted prefix ids packed as big-endian u32) of the prompt prefixes
    each local replica served lately (prefixes.PrefixLedger): what routing assigns by."""
    labels: tuple[str, ...] = ()
    """This node's labels (`meshnode start --label`), which deployments may require."""
    replica_extra_mb: int = 0
    """RAM (MB) each llama.cpp replica takes here beyond its model: the prompt cache
    (`prompt_cache_mb`). Placement budgets it."""
    gpu_mb: tuple[int, ...] = ()
    """Memory (MB) of each of this node's GPUs, by index: a vLLM or SGLang replica takes one
    GPU that fits its model (placement.py)."""
    draining: bool = False
    """The node is stopping (SIGINT/SIGTERM): placement moves its replicas elsewhere, and it
    serves them until their new holders are ready (Node.drain)."""


class NodeLoad(msgspec.Struct, frozen=True, array_like=True):
    """Carried on acks and push-pull (<= 256 B). ONLY APPEND fields, each with a default."""

    in_flight: int = 0
    """Requests this node's replicas are serving, all deployments together."""
    replicas: tuple[tuple[str, int], ...] | None = None
    """(deployment name, requests in flight) for each local replica serving any: what
    routing's load bound compares. None from a node that predates it, or whose list did not
    fit the load's bytes: routing then counts `in_flight` for each of its replicas."""


_LOAD_BYTES = MeshConfig().load_max_bytes  # the mesh refuses a larger load


def node_load(counts: Iterable[tuple[str, int]]) -> NodeLoad:
    """The load of a node whose replicas serve `counts` = (deployment, in flight): per replica
    (those serving any) while that fits the mesh's load bytes, else the node's total alone."""
    busy = tuple((name, n) for name, n in counts if n)
    load = NodeLoad(in_flight=sum(n for _, n in busy), replicas=busy)
    return load if len(msgspec.msgpack.encode(load)) <= _LOAD_BYTES else NodeLoad(load.in_flight)


class MemberView(msgspec.Struct, frozen=True, kw_only=True):
    """A member as GET /v1/cluster/nodes shows it."""

    name: str
    node_id: str
    address: str
    http: str
    state: str
    incarnation: int
    models: list[str]
    load: int
    since_s: float
    """Seconds since the member's state last changed, as this node saw it."""
    local: bool
    labels: tuple[str, ...] = ()
    """The member's labels (`meshnode start --label`)."""
    ram_mb: int = 0
    """The member's RAM, what placement budgets (0: unknown)."""
    gpu_mb: tuple[int, ...] = ()
    """Memory of each of the member's GPUs (MB), by index."""
    engines: tuple[str, ...] = ()
    """The engines the member can run (what placement and a launch anywhere count on)."""
    reachable: bool = True
    """False: this node failed to connect to the member's node-to-node port though membership
    says it is alive (a one-way partition), so it routes around it until a try succeeds."""
    draining: bool = False
    """The member is stopping: its replicas move to other nodes (NodeMeta.draining)."""


_meta_decoder = msgspec.msgpack.Decoder(NodeMeta)
_load_decoder = msgspec.msgpack.Decoder(NodeLoad)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes) -> object | None:
    try:
        return decoder.decode(data) if data else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class _Delegate:
    def __init__(self, meta: Callable[[], NodeMeta], load: Callable[[], NodeLoad]) -> None:
        self.meta, self.load = meta, load

    def node_meta(self) -> bytes:
        return msgspec.msgpack.encode(self.meta())

    def local_load(self) -> bytes:
        return msgspec.msgpack.encode(self.load())


class Cluster:
    def __init__(self, config: NodeConfig, node_id: str, meta: Callable[[], NodeMeta],
                 load: Callable[[], NodeLoad], security: ClusterSecurity | None = None) -> None:
        """With `security` the mesh is that of a signed cluster: its cluster id replaces the
        open `cluster` name, every datagram is sealed (GossipKeys) and every TCP exchange is
        mTLS checked by `security.mesh_peer_check`."""
        self.config = config
        self.security = security
        self.node_id = node_id
        self._delegate = _Delegate(meta, load)
        preset = MeshConfig.local if config.mesh_preset == "local" else MeshConfig.lan
        bind_host = config.bind or config.host
        advertise = None
        if config.advertise_addr:
            host, port = host_port(config.advertise_addr, config.gossip_port,
                                   "--advertise-addr")
            advertise = (host, port)
        # A node id is the hash of the node's own key, so the same id at a new address after
        # it died is that node restarted (new DHCP lease, new port): let it reclaim its id.
        self.keys = GossipKeys(node_id) if security is not None else None
        self.cluster_id = security.cluster_id if security is not None else config.cluster
        self.mesh = Mesh(preset(dead_node_reclaim_s=1.0), node_id=node_id, name=config.name,
                         bind=(bind_host, config.gossip_port), advertise=advertise,
                         cluster=self.cluster_id, delegate=self._delegate, sealer=self.keys,
                         server_ssl=security.server_context() if security else None,
                         client_ssl=security.client_context() if security else None,
                         peer_check=security.mesh_peer_check if security else None,
                         on_request=self.keys.handle_request if self.keys else None)
        if self.keys is not None:
            self.keys.attach(self.mesh)
        self.discovery: Discovery | None = None
        self._seeds = [host_port(s, DEFAULT_GOSSIP_PORT, "--join") for s in config.join]
        self._tasks: list[asyncio.Task[object]] = []
        self._last_meta = b""

    async def __aenter__(self) -> Self:
        await self.mesh.start()
        self._last_meta = self._delegate.node_meta()
        self._tasks.append(asyncio.create_task(self._watch_meta(), name="cluster:meta"))
        if self._seeds:
            self._tasks.append(asyncio.create_task(self._join_seeds(), name="cluster:join"))
        mdns_ip = self._mdns_ip()
        if mdns_ip is not None:
            self.discovery = Discovery(
                node_id=self.node_id, cluster=self.cluster_id, bind_ip=mdns_ip,
                gossip_port=self.mesh.address[1], http_port=self.config.http_port,
                protocol=PROTOCOL_VERSION, on_found=self._found)
            await self.discovery.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _mdns_ip(self) -> str | None:
        """mDNS only where the node is bound, never on loopback, never when told not to."""
        if not self.config.mdns:
            return None
        ip = self.config.interface or self.mesh.address[0]
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        return None if addr.is_loopback or addr.is_unspecified else ip

    def _found(self, found: Found) -> None:
        if any(m.node_id == found.node_id and m.state is MemberState.ALIVE
               for m in self.mesh.members()):
            return
        task = asyncio.create_task(self._try_join([(found.host, found.gossip_port)]))
        self._tasks.append(task)

    async def _try_join(self, seeds: list[tuple[str, int]]) -> bool:
        try:
            await self.mesh.join(seeds)
            return True
        except Exception as exc:  # noqa: BLE001 - JoinError, OSError: the seed may come up later
            log.info("cluster.join_failed", seeds=seeds, error=str(exc))
            return False

    async def _join_seeds(self) -> None:
        """Join the seeds; retry those we cannot reach while we are alone (rejoin)."""
        delay = 1.0
        while True:
            alive = [m for m in self.mesh.members() if m.state is MemberState.ALIVE]
            if len(alive) <= 1 and await self._try_join(self._seeds):
                delay = 1.0
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _watch_meta(self) -> None:
        rejected: dict[str, int] = {}
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            if self.keys is not None and tick % 30 == 0:  # totals since start, logged when they grew
                now = self.keys.rejected
                if now != rejected:
                    log.info("gossip.rejected", **{k: v for k, v in now.items() if v})
                    rejected = now
            meta = self._delegate.node_meta()
            if meta != self._last_meta:
                self._last_meta = meta
                self.mesh.update_meta()

    @property
    def gossiped_meta(self) -> bytes:
        """The meta this node last gave the mesh (NodeMeta, msgpack)."""
        return self._last_meta

    def refresh_meta(self) -> None:
        """Gossip a changed meta now rather than at the next check."""
        meta = self._delegate.node_meta()
        if meta != self._last_meta:
            self._last_meta = meta
            self.mesh.update_meta()

    async def leave(self, timeout_s: float = 3.0) -> None:
        with contextlib.suppress(Exception):
            await self.mesh.leave(timeout_s)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.close()
        await self.mesh.close()
        if self.keys is not None:
            await self.keys.close()

    def revoke(self, node_ids: frozenset[str]) -> None:
        """Drop revoked nodes: their gossip keys, their membership (declared dead)."""
        for node_id in node_ids:
            if self.keys is not None:
                self.keys.deny(node_id)
            with contextlib.suppress(Exception):
                self.mesh.evict(node_id)

    def members(self, unreachable: Container[str] = ()) -> list[MemberView]:
        """Every member as this node sees it; `unreachable`: the node ids it routes around."""
        now = asyncio.get_running_loop().time()
        views = []
        security = self.security
        for m in sorted(self.mesh.members(), key=lambda m: m.name):
            if security is not None and security.is_revoked(m.node_id):
                continue
            meta = _decode(_meta_decoder, m.meta)
            load = _decode(_load_decoder, m.load)
            known = meta if isinstance(meta, NodeMeta) else None
            views.append(MemberView(
                name=m.name, node_id=m.node_id, address=f"{m.addr[0]}:{m.addr[1]}",
                http=f"{known.http_host}:{known.http_port}" if known else "",
                state=m.state.name.lower(), incarnation=m.incarnation,
                models=[f"{d}({s})" for d, s in known.replicas] if known else [],
                load=load.in_flight if isinstance(load, NodeLoad) else 0,
                since_s=round(max(0.0, now - m.state_change), 1),
                local=m.node_id == self.node_id,
                labels=known.labels if known else (), ram_mb=known.ram_mb if known else 0,
                gpu_mb=known.gpu_mb if known else (), engines=known.engines if known else (),
                reachable=m.node_id not in unreachable,
                draining=known.draining if known else False))
        return views

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.mesh.members() if m.node_id == node_id), None)
