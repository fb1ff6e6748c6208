"""Mesh over real sockets: several nodes in one event loop on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from meshnode.mesh import (
    JoinError,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    Mesh,
    MeshConfig,
    MeshState,
    MeshStateError,
    StaticDelegate,
)
from meshnode.mesh.wire import Addr

CONFIG = MeshConfig.local()
ALIVE, SUSPECT, DEAD, LEFT = MemberState


async def until(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``predicate`` until it holds; fail after timeout_s."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def state_of(mesh: Mesh, node_id: str) -> MemberState | None:
    for m in mesh.members():
        if m.node_id == node_id:
            return m.state
    return None


def new_mesh(i: int, **kwargs: object) -> Mesh:
    return Mesh(CONFIG, node_id=f"node{i}", name=f"n{i}", bind=("127.0.0.1", 0),
                cluster="test", rng=random.Random(i), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def cluster() -> AsyncIterator[list[Mesh]]:
    async with AsyncExitStack() as stack:
        meshes = [await stack.enter_async_context(new_mesh(i)) for i in range(4)]
        for mesh in meshes[1:]:
            assert await mesh.join([meshes[0].address]) == 1
        await until(lambda: all(state_of(a, b._node_id) == ALIVE
                                for a in meshes for b in meshes), timeout_s=10)
        yield meshes


async def test_join_crash_and_leave(cluster: list[Mesh]) -> None:
    a, b, c, d = cluster
    events = a.events()
    assert a.address[0] == "127.0.0.1" and a.address[1] > 0
    assert len(a.members()) == 4

    await d.close()  # crash: no leave
    await until(lambda: all(state_of(m, "node3") == DEAD for m in (a, b, c)), timeout_s=15)

    await c.leave()
    assert c.state is MeshState.LEFT
    await until(lambda: all(state_of(m, "node2") == LEFT for m in (a, b)), timeout_s=2)
    await c.close()

    kinds = []
    async with asyncio.timeout(5):
        async for event in events:
            kinds.append((type(event), event.member.node_id))
            if (MemberLeft, "node2") in kinds:
                break
    assert (MemberDead, "node3") in kinds
    assert (MemberDead, "node2") not in kinds


async def test_events_stream_sees_joins_and_ends_on_close() -> None:
    async with new_mesh(10) as a:
        events = a.events()
        async with new_mesh(11) as b:
            await b.join([a.address])
            async with asyncio.timeout(5):
                first = await anext(events)
            assert isinstance(first, MemberJoined) and first.member.node_id == "node11"
        await a.close()
        async with asyncio.timeout(1):
            rest = [e async for e in events]  # the stream ends when the mesh closes
        assert all(e.member.node_id == "node11" for e in rest)


async def test_meta_update_reaches_peers() -> None:
    delegate = StaticDelegate(meta=b"v1")
    async with new_mesh(20, delegate=delegate) as a, new_mesh(21) as b:
        await b.join([a.address])
        await until(lambda: any(m.meta == b"v1" for m in b.members()), timeout_s=5)
        delegate.meta = b"v2"
        a.update_meta()
        await until(lambda: any(m.meta == b"v2" for m in b.members()), timeout_s=5)


async def test_lifecycle_states_and_double_close() -> None:
    mesh = new_mesh(30)
    assert mesh.state is MeshState.NEW
    with pytest.raises(MeshStateError):
        await mesh.join([("127.0.0.1", 1)])
    await mesh.start()
    with pytest.raises(MeshStateError):
        await mesh.start()
    assert mesh.state is MeshState.RUNNING
    await mesh.close()
    await mesh.close()
    assert mesh.state is MeshState.CLOSED
    with pytest.raises(MeshStateError):
        await mesh.join([("127.0.0.1", 1)])
    await new_mesh(31).close()  # closing a mesh never started is fine too


async def test_join_unreachable_seed_raises() -> None:
    async with new_mesh(40) as a:
        with pytest.raises(JoinError):
            await a.join([("127.0.0.1", 1)])
        assert a.stats["stream.fail"] == 1


class XorSealer:
    """A stand-in for the authenticator: a 4-byte tag, checked on open."""

    overhead = 4

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.refused = 0

    def seal(self, data: bytes, addr: Addr) -> bytes:
        return self.key + data

    def open(self, data: bytes, addr: Addr) -> bytes | None:
        if not data.startswith(self.key):
            self.refused += 1
            return None
        return data[4:]


async def test_packet_sealer_seam() -> None:
    # Without TLS, TCP traffic (push-pull, fallback pings) passes whatever the sealer says:
    # only the datagram seam is under test here, so the TCP fallback probe is off.
    udp_only = MeshConfig.local(tcp_fallback_probe=False)

    def make(i: int, key: bytes) -> Mesh:
        return Mesh(udp_only, node_id=f"node{i}", bind=("127.0.0.1", 0), cluster="test",
                    sealer=XorSealer(key), rng=random.Random(i))

    async with make(50, b"key1") as a, make(51, b"key1") as b, make(52, b"key2") as intruder:
        await b.join([a.address])
        await until(lambda: state_of(a, "node51") == ALIVE, timeout_s=5)
        # The intruder's join (TCP) gets through; its datagrams do not: never acked, it is
        # soon suspected, while the member with the right key stays alive.
        await intruder.join([a.address])
        await until(lambda: state_of(a, "node52") in (SUSPECT, DEAD), timeout_s=10)
        assert a.stats["drop.unsealed"] > 0
        assert state_of(a, "node51") == ALIVE


async def test_garbage_datagrams_are_counted_not_fatal() -> None:
    async with new_mesh(60) as a:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=a.address)
        try:
            for data in (b"\xc1", b"\x93\x01\xa4test\x91", b"x" * 1500,
                         b"\x93\x01\xa5other\x93\xa4ping\x01\xa6node60"):
                transport.sendto(data)
            await until(lambda: sum(v for k, v in a.core_stats.items()
                                    if k.startswith("drop.")) >= 4, timeout_s=5)
        finally:
            transport.close()
        stats = a.core_stats
        assert (stats["drop.malformed"], stats["drop.oversized"], stats["drop.cluster"]) == (
            2, 1, 1)
        assert a.state is MeshState.RUNNING
