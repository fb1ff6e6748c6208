"""The Swim core driven by hand: one node, packets crafted and inspected message by message."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.mesh import (
    ConfigError,
    MemberAlive,
    MemberIndirect,
    MemberJoined,
    MemberLoad,
    MemberState,
    MemberSuspected,
    MeshConfig,
    Output,
    StaticDelegate,
    Swim,
    wire,
)
from meshnode.mesh.wire import (
    Ack,
    Addr,
    Alive,
    Compound,
    Dead,
    Msg,
    Nack,
    NodeState,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

CLUSTER = "testcluster"
ME: Addr = ("10.0.0.1", 7701)
PEER1: Addr = ("10.0.1.1", 7701)


def peer(i: int) -> tuple[str, Addr]:
    return f"peer{i}", (f"10.0.1.{i}", 7701)


def flatten(data: bytes) -> list[Msg]:
    msg = wire.decode_packet(data, CLUSTER, 1 << 20)
    return list(msg.msgs) if isinstance(msg, Compound) else [msg]  # type: ignore[list-item]


class Harness:
    def __init__(self, config: MeshConfig | None = None, *, peers: int = 0, seed: int = 1,
                 **kwargs: object) -> None:
        self.delegate = StaticDelegate(meta=b"meta0", load=b"load0")
        self.now = 0.0
        self.swim = Swim(config or MeshConfig.lan(), node_id="me", name="me", addr=ME,
                         rng=random.Random(seed), now=0.0, cluster=CLUSTER,
                         delegate=self.delegate, **kwargs)  # type: ignore[arg-type]
        states = [NodeState(*peer(i)[:1], f"p{i}", peer(i)[1], b"", 1, MemberState.ALIVE)
                  for i in range(peers)]
        self.swim.preload(0.0, states)
        self.sent: list[tuple[Addr, Msg]] = []
        self.streams: list[tuple[Addr, bytes]] = []
        self.events: list[object] = []

    def _take(self, out: Output) -> Output:
        for addr, data in out.packets:
            assert len(data) <= 1400
            self.sent.extend((addr, m) for m in flatten(data))
        self.streams.extend(out.streams)
        self.events.extend(out.events)
        return out

    def recv(self, *msgs: Msg, src: Addr = PEER1) -> Output:
        data = wire.pack(CLUSTER, list(msgs))
        return self._take(self.swim.receive(self.now, data, src))

    def run_to(self, t: float) -> None:
        while self.swim.next_deadline() <= t:
            self.now = max(self.now, self.swim.next_deadline())
            self._take(self.swim.tick(self.now))
        self.now = t

    def run_until_sent(self, kind: type) -> tuple[Addr, Msg]:
        """Tick by tick until a message of ``kind`` goes out; the time is then ``self.now``."""
        for _ in range(10_000):
            self.now = self.swim.next_deadline()
            self._take(self.swim.tick(self.now))
            found = [(a, m) for a, m in self.sent if isinstance(m, kind)]
            if found:
                return found[0]
        raise AssertionError(f"no {kind.__name__} sent")

    def pop_sent(self) -> list[tuple[Addr, Msg]]:
        sent, self.sent = self.sent, []
        return sent


def test_ping_is_acked_with_load() -> None:
    h = Harness()
    h.recv(Ping(42, "me"))
    acks = [(a, m) for a, m in h.pop_sent() if isinstance(m, Ack)]
    assert acks == [(peer(1)[1], Ack(42, 1, b"load0", 1))]
    h.delegate.load = b"load1"
    h.recv(Ping(43, "me"))
    assert [m for _, m in h.pop_sent() if isinstance(m, Ack)] == [Ack(43, 1, b"load1", 2)]


def test_ping_for_another_node_is_dropped() -> None:
    h = Harness()
    h.recv(Ping(1, "someone-else"))
    assert h.pop_sent() == []
    assert h.swim.stats["drop.wrong_node"] == 1


@pytest.mark.parametrize("accusation", [Suspect(1, "me", "peer1"), Dead(1, "me", "peer1")])
def test_accusation_is_refuted(accusation: Msg) -> None:
    h = Harness(peers=3)
    h.recv(accusation)
    assert h.swim.local_member().incarnation == 2
    assert h.swim.local_member().state == MemberState.ALIVE
    assert h.swim.health_score == 1  # Lifeguard: being suspected hints at our own trouble
    h.recv(Ping(7, "me"))  # the refutation rides on the next outgoing packet
    alive = [m for _, m in h.pop_sent() if isinstance(m, Alive)]
    assert alive and alive[0].inc == 2 and alive[0].node == "me"


def test_alive_echo_of_ourselves_is_not_refuted() -> None:
    h = Harness()
    h.recv(Alive(1, "me", "me", ME, b"meta0"))
    assert h.swim.local_member().incarnation == 1 and h.swim.stats["refute"] == 0
    h.recv(Alive(5, "me", "me", ME, b"stale meta of a previous life"))
    assert h.swim.local_member().incarnation == 6


def test_member_lifecycle_from_messages() -> None:
    h = Harness(peers=4)
    node, addr = peer(9)
    h.recv(Alive(1, node, "p9", addr, b"m"))
    assert isinstance(h.events[-1], MemberJoined) and h.events[-1].member.meta == b"m"
    h.recv(Suspect(1, node, "peer1"))
    assert isinstance(h.events[-1], MemberSuspected)
    h.recv(Alive(2, node, "p9", addr, b"m"))
    assert isinstance(h.events[-1], MemberAlive) and not h.events[-1].recovered
    h.recv(Alive(1, node, "p9", addr, b"older"))  # stale: ignored
    assert h.swim.member(node).meta == b"m"  # type: ignore[union-attr]
    h.recv(Dead(2, node, "peer1"))
    assert h.swim.member(node).state == MemberState.DEAD  # type: ignore[union-attr]
    h.recv(Alive(3, node, "p9", addr, b"m"))
    assert isinstance(h.events[-1], MemberAlive) and h.events[-1].recovered
    h.recv(Dead(3, node, node))  # from itself: a graceful leave
    assert h.swim.member(node).state == MemberState.LEFT  # type: ignore[union-attr]


def test_address_conflict_is_dropped() -> None:
    h = Harness(peers=2)
    h.recv(Alive(5, "peer1", "p1", ("10.9.9.9", 7701)))
    assert h.swim.member("peer1").addr == peer(1)[1]  # type: ignore[union-attr]
    assert h.swim.stats["addr_conflict"] == 1


def test_oversized_meta_is_dropped() -> None:
    h = Harness(MeshConfig.lan(meta_max_bytes=16))
    h.recv(Alive(1, "x", "x", ("10.0.0.9", 1), b"m" * 17))
    assert h.swim.member("x") is None and h.swim.stats["drop.meta_too_large"] == 1


def test_failed_probe_goes_indirect_then_suspects() -> None:
    h = Harness(peers=5)
    target_addr, ping = h.run_until_sent(Ping)
    assert isinstance(ping, Ping)
    start = h.now
    h.pop_sent()
    h.run_to(start + 0.55)  # past probe_timeout: ping-req to indirect_checks others
    reqs = [(a, m) for a, m in h.pop_sent() if isinstance(m, PingReq)]
    assert len(reqs) == 3 and {m.target for _, m in reqs} == {ping.target}
    assert target_addr not in {a for a, _ in reqs}
    for addr, req in reqs[:2]:  # two relays nack, one is silent
        h.recv(Nack(req.seq), src=addr)
    h.run_to(start + 1.0)  # the probe period ends with no ack
    assert isinstance(h.events[-1], MemberSuspected)
    assert h.events[-1].member.node_id == ping.target
    assert h.swim.health_score == 1  # one missing nack


@pytest.mark.parametrize("relayed", [True, False])
def test_an_ack_relayed_by_a_helper_says_the_direct_path_may_be_cut(relayed: bool) -> None:
    h = Harness(peers=5)
    target_addr, ping = h.run_until_sent(Ping)
    assert isinstance(ping, Ping)
    start = h.now
    h.run_to(start + 0.55)  # no direct ack: ping-reqs go out
    helper = next(a for a, m in h.pop_sent() if isinstance(m, PingReq))
    # The helper forwards the target's ack under our seq; a late direct ack comes from the
    # target's own address.
    h.recv(Ack(ping.seq, 1), src=helper if relayed else target_addr)
    h.run_to(start + 1.5)  # past this probe's deadline
    indirect = [e for e in h.events if isinstance(e, MemberIndirect)]
    assert [e.member.node_id for e in indirect] == ([ping.target] if relayed else [])
    assert h.swim.stats["probe.indirect"] == relayed
    assert not any(isinstance(e, MemberSuspected) for e in h.events)
    assert h.swim.health_score == 0


def test_a_direct_ack_in_time_raises_no_event() -> None:
    h = Harness(peers=3)
    target_addr, ping = h.run_until_sent(Ping)
    h.recv(Ack(ping.seq, 1), src=target_addr)
    h.run_to(h.now + 2.0)
    assert not any(isinstance(e, MemberIndirect) for e in h.events)


def test_probe_acked_lowers_health_score() -> None:
    h = Harness(peers=3)
    h.recv(Suspect(1, "me", "peer1"))
    assert h.swim.health_score == 1
    h.run_to(2.0)
    for addr, m in h.pop_sent():
        if isinstance(m, Ping):
            h.recv(Ack(m.seq), src=addr)
    assert h.swim.health_score == 0


def test_probing_a_suspect_tells_it() -> None:
    h = Harness(peers=1)
    h.recv(Suspect(1, "peer0", "peer1"))
    h.run_to(3.0)
    sent = [m for _, m in h.pop_sent()]
    assert any(isinstance(m, Ping) for m in sent)
    assert Suspect(1, "peer0", "me") in sent


def test_ping_req_relay_forwards_ack_or_nacks() -> None:
    h = Harness(peers=3)
    origin, target = peer(1)[1], peer(2)[1]
    h.recv(PingReq(100, "peer2", target, True), src=origin)
    (addr, ping), = [(a, m) for a, m in h.pop_sent() if isinstance(m, Ping)]
    assert addr == target
    h.recv(Ack(ping.seq, 3, b"L", 9), src=target)
    assert (origin, Ack(100, 3, b"L", 9)) in h.pop_sent()
    h.recv(PingReq(101, "peer2", target, True), src=origin)
    h.pop_sent()
    h.run_to(h.now + 0.6)
    assert (origin, Nack(101)) in h.pop_sent()


def test_push_pull_request_is_answered_and_merged() -> None:
    h = Harness(peers=1)
    states = (NodeState("peer7", "p7", peer(7)[1], b"", 3, MemberState.ALIVE, b"L7", 4),
              NodeState("peer0", "p0", peer(0)[1], b"", 1, MemberState.DEAD))
    body = wire.encode_packet(CLUSTER, PushPull(True, False, states))
    out = h.swim.on_stream(0.5, body, peer(7)[1])
    assert out.reply is not None
    reply = wire.decode_packet(out.reply, CLUSTER, 1 << 20)
    assert isinstance(reply, PushPull) and reply.reply and reply.join
    assert {s.node for s in reply.states} == {"me", "peer0"}
    assert h.swim.member("peer7").load == b"L7"  # type: ignore[union-attr]
    # The peer believes peer0 dead: we only suspect it (it gets a chance to refute).
    assert h.swim.member("peer0").state == MemberState.SUSPECT  # type: ignore[union-attr]
    kinds = {type(e) for e in out.events}
    assert {MemberJoined, MemberLoad, MemberSuspected} <= kinds


def test_push_pull_over_udp_and_nack_over_tcp_are_refused() -> None:
    h = Harness()
    pushpull = wire.encode_packet(CLUSTER, PushPull(False, False, ()))
    h.swim.receive(0.0, pushpull, peer(1)[1])
    out = h.swim.on_stream(0.0, wire.encode_packet(CLUSTER, Nack(1)), peer(1)[1])
    assert out.reply is None and h.swim.stats["drop.unexpected"] == 2


def test_ping_over_tcp_is_answered_on_the_stream() -> None:
    h = Harness()
    out = h.swim.on_stream(0.0, wire.encode_packet(CLUSTER, Ping(9, "me")), peer(1)[1])
    assert out.reply is not None and out.packets == []
    assert wire.decode_packet(out.reply, CLUSTER, 1400) == Ack(9, 1, b"load0", 1)


def test_tcp_fallback_ack_prevents_suspicion_without_lowering_health() -> None:
    h = Harness(peers=4)
    _, ping = h.run_until_sent(Ping)
    assert isinstance(ping, Ping)
    start = h.now
    h.run_to(start + 0.55)
    (addr, body), = h.streams
    assert wire.decode_packet(body, CLUSTER, 1400) == Ping(ping.seq, ping.target)
    h.swim.on_stream(h.now, wire.encode_packet(CLUSTER, Ack(ping.seq)), addr)  # its reply
    h.run_to(start + 1.0)
    assert h.swim.stats["probe.tcp_only"] == 1 and h.swim.stats["probe.fail"] == 0
    assert not [e for e in h.events if isinstance(e, MemberSuspected)]


def test_load_from_ack_is_recorded_newest_wins() -> None:
    h = Harness(peers=1)
    addr, ping = h.run_until_sent(Ping)
    assert isinstance(ping, Ping)
    h.recv(Ack(ping.seq, 1, b"busy", 5), src=addr)
    assert h.swim.member("peer0").load == b"busy"  # type: ignore[union-attr]
    assert isinstance(h.events[-1], MemberLoad)
    states = (NodeState("peer0", "p0", addr, b"", 1, MemberState.ALIVE, b"stale", 4),)
    h.swim.on_stream(1.5, wire.encode_packet(CLUSTER, PushPull(False, True, states)),
                           addr)
    assert h.swim.member("peer0").load == b"busy"  # type: ignore[union-attr]


def test_retransmit_limit_on_the_wire() -> None:
    cfg = MeshConfig.lan(push_pull_interval_s=0, reconnect_interval_s=0)
    h = Harness(cfg, peers=20)  # 21 members: limit = 4 * ceil(log10 22) = 8
    h.run_to(0.5)
    h.pop_sent()
    h.recv(Dead(1, "peer5", "peer1"))
    h.run_to(30.0)
    copies = [a for a, m in h.pop_sent() if m == Dead(1, "peer5", "peer1")]
    assert len(copies) == 8
    assert peer(5)[1] in copies or len(set(copies)) > 1  # to random peers, the dead one too


def test_leave_gossips_dead_about_itself() -> None:
    h = Harness(peers=3)
    h.swim.leave(0.0)
    assert h.swim.local_member().state == MemberState.LEFT and not h.swim.leave_done
    h.run_to(5.0)
    dead = [m for _, m in h.pop_sent() if isinstance(m, Dead)]
    assert dead and all(m == Dead(1, "me", "me") for m in dead)
    assert h.swim.leave_done
    assert not [m for _, m in h.pop_sent() if isinstance(m, Ping)]  # no probing after leave


def test_leave_tells_every_live_member_at_once() -> None:
    """Gossip picks random peers and may miss one, which would then time out its probes and
    record a failure (dead) instead of a leave: the leave goes to each live member directly."""
    h = Harness(peers=6)
    h.recv(Dead(1, "peer5", "peer1"))  # a dead member needs no telling
    h.pop_sent()
    h._take(h.swim.leave(0.0))
    told = [a for a, m in h.pop_sent() if m == Dead(1, "me", "me")]
    assert set(told) >= {peer(i)[1] for i in range(5)}


def test_update_meta_raises_incarnation() -> None:
    h = Harness(peers=2)
    h.delegate.meta = b"meta1"
    h.swim.update_meta(0.0)
    assert h.swim.local_member().incarnation == 2
    h.run_to(1.0)
    assert Alive(2, "me", "me", ME, b"meta1") in [m for _, m in h.pop_sent()]


def test_identity_and_budget_are_validated() -> None:
    with pytest.raises(ConfigError):
        Swim(MeshConfig.lan(), node_id="x" * 65, name="n", addr=ME, rng=random.Random(), now=0)
    with pytest.raises(ConfigError):  # an alive with 1024 bytes of meta cannot fit 1000
        Swim(MeshConfig.lan(), node_id="x", name="n", addr=ME, rng=random.Random(), now=0,
             max_packet_bytes=1000)
    with pytest.raises(ConfigError):
        Swim(MeshConfig.lan(meta_max_bytes=4), node_id="x", name="n", addr=ME,
             rng=random.Random(), now=0, delegate=StaticDelegate(meta=b"12345"))


def test_packets_respect_a_lowered_budget() -> None:
    h = Harness(MeshConfig.lan(meta_max_bytes=64), peers=30, max_packet_bytes=700)
    for i in range(40):
        h.swim.receive(0.0, wire.pack(CLUSTER, [
            Alive(1, f"new{i}", "n" * 60, (f"10.2.0.{i}", 7701), b"m" * 64)]), peer(1)[1])
    t, sizes = 0.0, []
    while t < 10.0:
        t = h.swim.next_deadline()
        sizes += [len(d) for _, d in h.swim.tick(t).packets]
    assert max(sizes) <= 700 and len(sizes) > 20


# ---- bad input: fuzzing the receive path -----------------------------------------------------

ids = st.sampled_from(["me", "peer0", "peer1", "peer2", "ghost"])
u32 = st.integers(0, 2**32 - 1)
addrs = st.sampled_from([ME, peer(0)[1], peer(1)[1], ("10.9.9.9", 1)])
msgs = st.one_of(
    st.builds(Ping, u32, ids), st.builds(Ack, u32, u32, st.binary(max_size=300)),
    st.builds(Nack, u32), st.builds(PingReq, u32, ids, addrs, st.booleans()),
    st.builds(Alive, u32, ids, st.text(max_size=8), addrs, st.binary(max_size=1024)),
    st.builds(Suspect, u32, ids, ids), st.builds(Dead, u32, ids, ids),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1600))
def test_fuzz_garbage_never_raises_nor_changes_state(data: bytes) -> None:
    h = Harness(peers=3)
    before = h.swim.members()
    out = h.swim.receive(0.1, data, peer(1)[1])
    assert out.packets == [] and out.events == []
    assert h.swim.members() == before
    dropped = sum(v for k, v in h.swim.stats.items() if k.startswith("drop."))
    assert dropped == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(msgs, min_size=1, max_size=6), st.sampled_from(["ok", "cluster", "version"]))
def test_fuzz_valid_messages_never_raise(batch: list[Msg], variant: str) -> None:
    h = Harness(MeshConfig.lan(meta_max_bytes=512), peers=3)
    cluster = "other" if variant == "cluster" else CLUSTER
    data = wire.pack(cluster, batch)
    if variant == "version":
        data = data[:1] + b"\x05" + data[2:]  # version field of the envelope
    before = h.swim.members()
    h.swim.receive(0.1, data, peer(1)[1])
    if variant != "ok":
        assert h.swim.members() == before
        assert h.swim.stats[f"drop.{variant}"] == 1
    t = 0.1
    for _ in range(50):  # and the core keeps running on whatever it accepted
        t = max(t, h.swim.next_deadline())
        h.swim.tick(t)


def test_drop_reasons_are_counted() -> None:
    h = Harness()
    h.swim.receive(0, b"\x00" * 1401, peer(1)[1])
    h.swim.receive(0, b"\xc1", peer(1)[1])
    h.swim.receive(0, wire.encode_packet("other", Ping(1, "me")), peer(1)[1])
    stats = h.swim.stats
    assert (stats["drop.oversized"], stats["drop.malformed"], stats["drop.cluster"]) == (1, 1, 1)
    out = h.swim.on_stream(0, b"garbage", peer(1)[1])
    assert out.reply is None and stats["drop.malformed"] == 2
