"""Sealed gossip (GossipKeys) between real Mesh instances over mTLS on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.mesh import MemberState, Mesh, MeshConfig
from meshnode.mesh.certs import init_ca, issue_node_bundle
from meshnode.mesh.gossip_keys import GossipKeys
from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.packet_auth import PacketAuthConfig
from meshnode.mesh.tls import check_peer, client_context, server_context
from meshnode.mesh.wire import Addr

CONFIG = MeshConfig.local()
ALIVE = MemberState.ALIVE


async def until(predicate: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


class Signed:
    """A mesh of a signed cluster with its GossipKeys."""

    def __init__(self, ca, i: int,  # type: ignore[no-untyped-def]
                 auth: PacketAuthConfig | None = None) -> None:
        bundle = issue_node_bundle(ca, f"n{i}")
        self.node_id = bundle.node_id
        self.keys = GossipKeys(bundle.node_id, auth)

        def peer_check(ssl_object: ssl.SSLObject | None, addr: Addr) -> str:
            node_id = check_peer(ssl_object, ca.cert).node_id
            if node_id in self.keys.denied:  # as a node's revocation check does
                raise PermissionError(f"{node_id} is revoked")
            return node_id

        self.mesh = Mesh(CONFIG, node_id=bundle.node_id, name=f"n{i}",
                         bind=("127.0.0.1", 0), cluster=ca.cluster_id, rng=random.Random(i),
                         sealer=self.keys,
                         server_ssl=server_context(bundle.cert, bundle.private_key, ca.cert),
                         client_ssl=client_context(bundle.cert, bundle.private_key, ca.cert),
                         peer_check=peer_check,
                         on_request=self.keys.handle_request)
        self.keys.attach(self.mesh)

    def alive(self) -> set[str]:
        return {m.node_id for m in self.mesh.members() if m.state is ALIVE}


@pytest.fixture
def ca(tmp_path: Path):  # type: ignore[no-untyped-def]
    return init_ca(tmp_path / "ca", "test", None, allow_unencrypted=True)


@pytest.fixture
async def nodes(ca) -> AsyncIterator[list[Signed]]:  # type: ignore[no-untyped-def]
    async with AsyncExitStack() as stack:
        out = [Signed(ca, i) for i in range(3)]
        for n in out:
            await stack.enter_async_context(n.mesh)
            stack.push_async_callback(n.keys.close)
        for n in out[1:]:
            assert await n.mesh.join([out[0].mesh.address]) == 1
        ids = {n.node_id for n in out}
        await until(lambda: all(n.alive() == ids for n in out), timeout_s=10)
        yield out


async def test_sealed_cluster_forms_without_suspicion(nodes: list[Signed]) -> None:
    for n in nodes:
        assert n.keys.stats["kx.completed"] + n.keys.stats["kx.accepted"] >= 1
        assert n.mesh.core_stats["refute"] == 0, "nobody was suspected"
        assert n.keys.stats["seal.failed"] == 0
    assert sum(n.keys.rejected["auth"] for n in nodes) == 0


async def test_forged_datagrams_are_counted_and_change_nothing(nodes: list[Signed]) -> None:
    target = nodes[0]
    before = sorted((m.node_id, m.state, m.incarnation) for m in target.mesh.members())
    sender = nodes[1].keys.auth
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for i in range(100):
            udp.sendto(b"x" * 10, target.mesh.address)  # short
            # A well-formed header of a real member with a bad tag.
            header = bytes([1, 0]) + b"\0\0\0\0" + bytes(8) + (10**6 + i).to_bytes(8, "big")
            udp.sendto(header + bytes(40), target.mesh.address)
        # A real sealed packet, then its replay; a fresh one with one flipped bit.
        sealed = sender.seal(target.node_id, b"\x93\x01\xa1x\x90")
        udp.sendto(sealed, target.mesh.address)
        udp.sendto(sealed, target.mesh.address)
        fresh = sender.seal(target.node_id, b"\x93\x01\xa1x\x90")
        udp.sendto(fresh[:-1] + bytes([fresh[-1] ^ 1]), target.mesh.address)
    keys = target.keys
    await until(lambda: keys.rejected["short"] >= 100 and keys.rejected["replay"] >= 1
                and keys.rejected["auth"] >= 1, timeout_s=5)
    assert keys.rejected["unknown_peer"] >= 100
    after = sorted((m.node_id, m.state, m.incarnation) for m in target.mesh.members())
    assert after == before


async def test_lost_key_answer_is_retried_soon(ca) -> None:  # type: ignore[no-untyped-def]
    """a offers, b installs, b's answer is lost: a retries after retry_s (0.2 s), not at the
    next push-pull, and the pair ends with one key on both sides."""
    a, b = Signed(ca, 10), Signed(ca, 11)
    b.keys._want = lambda peer, addr: None  # type: ignore[method-assign]  # only a offers
    answer = b.keys.handle_request
    dropped: list[int] = []

    def lossy(payload: bytes, peer: str | None, addr: Addr) -> bytes | None:
        reply = answer(payload, peer, addr)
        if not dropped:  # b installed the key, but its answer never reaches a
            dropped.append(1)
            return None
        return reply

    b.mesh._on_request = lossy
    async with a.mesh, b.mesh:
        try:
            assert await a.mesh.join([b.mesh.address]) == 1
            loop = asyncio.get_running_loop()
            start = loop.time()
            await until(lambda: a.keys.stats["kx.completed"] >= 1, timeout_s=2)
            assert loop.time() - start < CONFIG.push_pull_interval_s / 2
            assert a.keys.stats["kx.failed"] == 1 and dropped == [1]
            await until(lambda: a.alive() == b.alive() == {a.node_id, b.node_id}, 5)
            assert a.keys.auth.current_epoch(b.node_id) == b.keys.auth.current_epoch(a.node_id)
        finally:
            await a.keys.close()
            await b.keys.close()


async def test_keys_are_rotated_while_gossip_goes_on(ca) -> None:  # type: ignore[no-untyped-def]
    auth = PacketAuthConfig(rekey_after_s=0.3, rekey_grace_s=1.0)
    a, b = Signed(ca, 20, auth), Signed(ca, 21, auth)
    async with a.mesh, b.mesh:
        try:
            assert await a.mesh.join([b.mesh.address]) == 1
            await until(lambda: a.keys.auth.current_epoch(b.node_id) >= 4, timeout_s=10)
            assert a.alive() == b.alive() == {a.node_id, b.node_id}
            assert a.mesh.core_stats["refute"] == b.mesh.core_stats["refute"] == 0
            assert a.keys.rejected["unknown_key"] == b.keys.rejected["unknown_key"] == 0
        finally:
            await a.keys.close()
            await b.keys.close()


async def test_denied_node_is_cut_off(nodes: list[Signed]) -> None:
    revoked = nodes[2]
    for n in nodes[:2]:
        n.keys.deny(revoked.node_id)
        n.mesh.evict(revoked.node_id)
    for n in nodes[:2]:
        assert revoked.node_id not in n.alive()
    await until(lambda: revoked.alive() == {revoked.node_id}, timeout_s=10)
    await asyncio.sleep(0.5)  # a while of gossip: it must not come back
    for n in nodes[:2]:
        assert revoked.node_id not in n.alive()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1500), payload=st.binary(max_size=200))
def test_fuzz_open_and_key_offers_never_crash(data: bytes, payload: bytes) -> None:
    """Any datagram or key-exchange payload: no exception, no key, no state change."""
    keys = GossipKeys(NodeIdentity.generate().node_id)
    peer = NodeIdentity.generate().node_id
    assert keys.open(data, ("127.0.0.1", 1)) is None
    reply = keys.handle_request(payload, None, ("127.0.0.1", 1))  # unauthenticated peer
    assert reply is None and not keys.auth.has_key(peer)
    keys.handle_request(payload, peer, ("127.0.0.1", 1))  # a malformed offer is refused
    assert keys.auth.has_key(peer) == (keys.stats["kx.accepted"] == 1)
