"""Reachability: peers this node failed to connect to are skipped until a background try
connects (real sockets on loopback); routing tries suspects last."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from meshnode.mesh import Member, MemberState
from meshnode.mesh.certs import init_ca, issue_node_bundle
from meshnode.mesh.tls import client_context, server_context
from meshnode.node import Target
from meshnode.node.cluster import NodeMeta
from meshnode.node.peers import SUSPECT_GRACE_S, PeerView
from meshnode.node.reach import CHECK_ATTEMPTS, Reachability, connects


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def reach() -> AsyncIterator[Reachability]:
    r = Reachability(first_s=0.05, max_s=0.2, timeout_s=1.0)
    yield r
    r.close()


async def _wait(cond: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def _t(name: str, url: str) -> Target:
    return Target(f"{name}-id", name, url, False)


async def test_skip_leaves_out_a_failed_peer_at_its_url_only(reach: Reachability) -> None:
    a, b, c = _t("a", "http://127.0.0.1:1"), _t("b", "http://127.0.0.1:2"), \
        _t("c", "http://127.0.0.1:3")
    assert reach.skip([a, b, c]) == [a, b, c]
    reach.failed("b-id", "b", b.url)
    assert reach.down == {"b-id": b.url}
    assert reach.skip([a, b, c]) == [a, c]  # order kept
    assert reach.skip([b]) == [b]  # the only one left is tried anyway
    moved = _t("b", "http://127.0.0.1:4")  # restarted elsewhere: a new address, tried
    assert reach.skip([moved, a]) == [moved, a]
    reach.failed("b-id", "b", b.url)  # reported again: one background try, not two
    assert len(reach._tries) == 1


async def test_a_peer_comes_back_when_a_connection_opens() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    reach = Reachability(first_s=0.05, max_s=0.1, timeout_s=1.0)
    try:
        reach.failed("p-id", "p", url)
        await asyncio.sleep(0.4)  # several tries, all refused
        assert reach.down == {"p-id": url}
        accepted = asyncio.Event()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", port)
        try:
            await _wait(lambda: not reach.down)
            assert accepted.is_set()
            assert not reach._tries  # the try ended with it
            assert reach.skip([_t("p", url)]) == [_t("p", url)]
        finally:
            server.close()
            await server.wait_closed()
    finally:
        reach.close()


async def test_a_hint_that_fails_to_connect_marks_the_peer_down(reach: Reachability) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    reach.check("p-id", "p", url)
    reach.check("p-id", "p", url)  # one check at a time per peer
    assert len(reach._checks) == 1
    await _wait(lambda: reach.down)
    assert reach.down == {"p-id": url} and not reach._checks
    assert "p-id" in reach._tries  # and it is tried again in the background, as after a
    reach.check("p-id", "p", url)  # failed connect; known down: no new check
    assert not reach._checks


async def test_a_hint_that_connects_changes_nothing(reach: Reachability) -> None:
    accepted = asyncio.Event()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        reach.check("p-id", "p", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        await _wait(lambda: not reach._checks)
        assert accepted.is_set()
        assert not reach.down and not reach._tries
    finally:
        server.close()
        await server.wait_closed()


async def test_forget_and_close_stop_the_tries(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", "cluster", b"pw")
    bob = issue_node_bundle(ca, "bob")
    reach = Reachability(lambda: client_context(bob.cert, bob.private_key, ca.cert),
                         first_s=0.05, max_s=0.2, timeout_s=30.0)
    reach.failed("a-id", "a", f"http://127.0.0.1:{_free_port()}")
    reach.failed("b-id", "b", f"http://127.0.0.1:{_free_port()}")
    # A listener that never answers the TLS handshake: the check hangs until cancelled.
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    reach.check("c-id", "c", f"https://127.0.0.1:{silent.sockets[0].getsockname()[1]}")
    await asyncio.sleep(0.1)
    tries = [*reach._tries.values(), *reach._checks.values()]
    reach.forget("a-id")
    assert set(reach.down) == {"b-id"}
    reach.close()
    reach.close()  # twice is safe
    assert not reach.down and not reach._tries and not reach._checks
    await asyncio.gather(*tries, return_exceptions=True)
    assert len(tries) == 3 and all(t.cancelled() for t in tries)
    for writer in held:
        writer.close()
    silent.close()
    await silent.wait_closed()


async def test_a_peer_found_unreachable_tells_the_hooks_once() -> None:
    """Each time a peer becomes unreachable at a URL (a failed connect, or a failed check),
    PeerView's on_stuck hooks hear of it once: the forwarding pool then moves the requests
    still waiting there (Upstream.drop_unanswered)."""
    view = PeerView(lambda: "me", lambda: None, None)
    heard: list[str] = []
    undo = view.on_stuck(lambda url, why: heard.append(url))
    a, b = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    try:
        view.reach.failed("a-id", "a", a)
        view.reach.failed("a-id", "a", a)  # reported again while down: nothing new
        assert heard == [a]
        view.reach.check("b-id", "b", b)
        await _wait(lambda: len(heard) == 2)
        assert heard == [a, b]
        undo()
        view.reach.forget("a-id")
        view.reach.failed("a-id", "a", a)
        assert heard == [a, b]  # undone
    finally:
        view.close()


async def test_a_suspicion_that_lasts_tells_the_hooks() -> None:
    """A member still suspect SUSPECT_GRACE_S after the event, at the same incarnation, is
    likely frozen: the on_stuck hooks hear of it. One that refuted (a busy moment), was
    declared dead meanwhile (its connections are dropped anyway) or is watched when the view
    closes is not reported."""
    members: dict[str, Member] = {}

    def member(n: str, state: MemberState, incarnation: int = 1) -> Member:
        meta = NodeMeta(n, "127.0.0.1", 9000 + ord(n))
        m = members[n] = Member(f"{n}-id", n, ("127.0.0.1", 1), msgspec.msgpack.encode(meta),
                                b"", state, incarnation, time.monotonic())
        return m

    cluster = SimpleNamespace(mesh=SimpleNamespace(members=lambda: list(members.values())))
    view = PeerView(lambda: "me", lambda: cluster, None)  # type: ignore[arg-type,return-value]
    heard: list[tuple[str, str]] = []
    view.on_stuck(lambda url, why: heard.append((url, why)))
    try:
        for n in "abcd":
            view.suspected(member(n, MemberState.SUSPECT))
        member("b", MemberState.ALIVE, 2)  # refuted
        member("c", MemberState.SUSPECT, 2)  # refuted, then suspected again: a new watch
        view.suspected(members["c"])
        view.gone(member("d", MemberState.DEAD))
        await asyncio.sleep(SUSPECT_GRACE_S / 2)
        assert heard == []  # not yet: a short suspicion is ignored
        await _wait(lambda: len(heard) == 2, SUSPECT_GRACE_S * 3)
        assert [url for url, _ in heard] == [f"http://127.0.0.1:{9000 + ord(n)}" for n in "ac"]
        assert "suspected" in heard[0][1]
        view.suspected(member("e", MemberState.SUSPECT))
        view.close()
        view.close()  # twice is safe
        await asyncio.sleep(SUSPECT_GRACE_S * 1.5)
        assert len(heard) == 2
    finally:
        view.close()


async def test_a_dead_or_departed_member_is_forgotten() -> None:
    view = PeerView(lambda: "me", lambda: None, None)
    try:
        view.reach.failed("x-id", "x", f"http://127.0.0.1:{_free_port()}")
        view.gone(Member("x-id", "x", ("127.0.0.1", 1), b"", b"", MemberState.DEAD, 1, 0.0))
        assert not view.reach.down and not view.reach._tries
    finally:
        view.reach.close()


async def test_routing_tries_suspects_last_and_skips_the_unreachable() -> None:
    """PeerView.usable over the holders gossip shows: a member suspect for SUSPECT_GRACE_S
    (frozen, or very busy) is moved to the end, a peer this node cannot connect to is left out, and when nothing else
    is left they are tried anyway, in the plan's order."""
    states = {"a": MemberState.ALIVE, "b": MemberState.SUSPECT, "c": MemberState.ALIVE,
              "d": MemberState.DEAD, "e": MemberState.SUSPECT}
    now = time.monotonic()
    since = {"e": now + 60}  # suspected just now: not yet moved (SUSPECT_GRACE_S)

    def member(n: str) -> Member:
        meta = NodeMeta(n, "127.0.0.1", 9000 + ord(n), replicas=(("m", "ready"),))
        return Member(f"{n}-id", n, ("127.0.0.1", 1), msgspec.msgpack.encode(meta), b"",
                      states[n], 1, since.get(n, now - SUSPECT_GRACE_S))

    cluster = SimpleNamespace(mesh=SimpleNamespace(members=lambda: [member(n) for n in states]))
    view = PeerView(lambda: "me", lambda: cluster, None)  # type: ignore[arg-type,return-value]
    try:
        routing = view.routing("m")
        assert set(routing.targets) == {"a-id", "b-id", "c-id", "e-id"}  # d is dead
        assert routing.suspects == frozenset({"b-id"})
        a, b, c = (routing.targets[f"{n}-id"] for n in "abc")
        assert view.usable([b, a, c], routing.suspects) == [a, c, b]
        assert view.usable([b], routing.suspects) == [b]
        view.reach.failed("a-id", "a", a.url)
        assert view.usable([b, a, c], routing.suspects) == [c, b]
        view.reach.failed("c-id", "c", c.url)
        assert view.usable([b, a, c], routing.suspects) == [b]
        assert view.usable([a, c], frozenset()) == [a, c]  # none left: tried anyway
        states["b"] = MemberState.ALIVE
        since["e"] = now - SUSPECT_GRACE_S  # e has been suspect long enough now
        view.changed()  # a membership event: the holders are read afresh
        assert view.routing("m").suspects == frozenset({"e-id"})
    finally:
        view.reach.close()


async def test_connects_answers_for_open_closed_and_silent_addresses() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await connects(f"http://127.0.0.1:{port}", None, 1.0)
        assert not await connects(f"http://127.0.0.1:{_free_port()}", None, 1.0)
        assert not await connects("http://127.0.0.1:notaport", None, 1.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_check_tries_several_connections_at_once(tmp_path: Path) -> None:
    """A check opens CHECK_ATTEMPTS connections at once and the first whose handshake
    completes ends it: two that get no answer (as when their packets are lost) do not make a
    working path look broken, where a single connection would have timed out."""
    ca = init_ca(tmp_path / "ca", "cluster", b"pw")
    alice, bob = issue_node_bundle(ca, "alice"), issue_node_bundle(ca, "bob")
    tls = server_context(alice.cert, alice.private_key, ca.cert)
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        if len(held) % 3 == 0:  # every third connection answers its handshake
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.start_tls(tls)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    ctx = client_context(bob.cert, bob.private_key, ca.cert)
    try:
        started = time.monotonic()
        assert await connects(url, ctx, 2.0, CHECK_ATTEMPTS)
        assert time.monotonic() - started < 1.5  # did not wait for the silent two
        assert not await connects(url, ctx, 0.5)  # the fourth alone: silent
        reach = Reachability(lambda: ctx, check_timeout_s=2.0)
        reach.check("a-id", "a", url)  # the fifth and sixth are silent, the seventh answers
        await _wait(lambda: not reach._checks)
        assert not reach.down and len(held) == 7
        reach.close()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connects_over_node_to_node_mtls(tmp_path: Path) -> None:
    """In a signed cluster a try is a full mTLS handshake with the node's own context: a
    listener that is not this cluster's (or closes first) does not count as reachable."""
    ca = init_ca(tmp_path / "ca", "cluster", b"pw")
    rogue = init_ca(tmp_path / "rogue", "cluster", b"pw")
    alice, bob = issue_node_bundle(ca, "alice"), issue_node_bundle(ca, "bob")
    mallory = issue_node_bundle(rogue, "mallory")
    handshakes: list[object] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshakes.append(writer.get_extra_info("ssl_object"))
        writer.close()

    server = await asyncio.start_server(
        accept, "127.0.0.1", 0, ssl=server_context(alice.cert, alice.private_key, ca.cert))
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        assert await connects(url, client_context(bob.cert, bob.private_key, ca.cert), 2.0)
        assert len(handshakes) == 1
        assert not await connects(url, client_context(mallory.cert, mallory.private_key,
                                                      rogue.cert), 2.0)
    finally:
        server.close()
        await server.wait_closed()
    plain = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:  # a plain listener that closes at once: no TLS session
        port = plain.sockets[0].getsockname()[1]
        assert not await connects(f"https://127.0.0.1:{port}",
                                  client_context(bob.cert, bob.private_key, ca.cert), 1.0)
    finally:
        plain.close()
        await plain.wait_closed()
