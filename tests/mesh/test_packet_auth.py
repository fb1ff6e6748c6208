"""Gossip packet authentication: AEAD, replay window, rekey grace, forged-packet handling."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.mesh.crypto_errors import PacketAuthError
from meshnode.mesh.identity import NodeIdentity, short_key_id
from meshnode.mesh.packet_auth import (
    HEADER_LEN,
    OVERHEAD,
    KeyShare,
    PacketAuthConfig,
    PacketSealer,
    Reject,
    derive_pair_keys,
)

A_ID = NodeIdentity.generate().node_id
B_ID = NodeIdentity.generate().node_id
C_ID = NodeIdentity.generate().node_id


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pair(config: PacketAuthConfig | None = None, clock: Clock | None = None):
    clock = clock or Clock()
    a = PacketSealer(A_ID, config, clock=clock)
    b = PacketSealer(B_ID, config, clock=clock)
    exchange(a, b)
    return a, b, clock


def exchange(initiator: PacketSealer, responder: PacketSealer) -> None:
    """One push-pull: offer -> accept -> complete, as over the mTLS channel."""
    offer = initiator.offer(responder.local_id)
    answer = responder.accept(initiator.local_id, offer)
    initiator.complete(responder.local_id, answer)


def window_state(sealer: PacketSealer):
    """Everything open() may change, for 'no state change' assertions."""
    state = []
    for peer in sealer._peers.values():
        for key in [peer.recv, *peer.grace]:
            state.append((peer.node_id, key.key_id, key.top, key.bits, key.expires))
    return state


def test_roundtrip_both_directions():
    a, b, _ = pair()
    packet = a.seal(B_ID, b"hello")
    assert len(packet) == OVERHEAD + 5
    assert b.open(packet) == (A_ID, b"hello")
    assert a.open(b.seal(A_ID, b"")) == (B_ID, b"")
    assert all(v == 0 for v in b.rejected.values())


def test_header_layout():
    a, _, _ = pair()
    p1, p2 = a.seal(B_ID, b"x"), a.seal(B_ID, b"y")
    assert p1[0] == 1 and p1[1] == 0  # version, flags
    assert p1[2:6] == p2[2:6]  # key id
    assert p1[6:14] == short_key_id(A_ID)
    assert int.from_bytes(p1[14:22], "big") == 1 and int.from_bytes(p2[14:22], "big") == 2
    assert HEADER_LEN == 22


def test_derived_keys_are_directional_and_agree():
    i_share, r_share = bytes(range(32)), bytes(range(32, 64))
    ka = derive_pair_keys(A_ID, B_ID, i_share, r_share, 7, local_is_initiator=True)
    kb = derive_pair_keys(B_ID, A_ID, i_share, r_share, 7, local_is_initiator=False)
    assert ka.send_key == kb.recv_key and ka.recv_key == kb.send_key
    assert ka.send_key != ka.recv_key and ka.exchange_id == kb.exchange_id
    assert derive_pair_keys(A_ID, B_ID, i_share, r_share, 8, local_is_initiator=True) != ka
    with pytest.raises(PacketAuthError):
        derive_pair_keys(A_ID, A_ID, i_share, r_share, 1, local_is_initiator=True)
    with pytest.raises(PacketAuthError):
        derive_pair_keys(A_ID, B_ID, b"short", r_share, 1, local_is_initiator=True)
    assert "send_key" not in repr(ka) and "share" not in repr(KeyShare(1, i_share))


def test_replay_rejected():
    a, b, _ = pair()
    packet = a.seal(B_ID, b"once")
    assert b.open(packet) is not None
    before = window_state(b)
    assert b.open(packet) is None and b.last_reject is Reject.REPLAY
    assert b.rejected["replay"] == 1 and window_state(b) == before


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (0, Reject.HEADER),
        (1, Reject.HEADER),
        (2, Reject.UNKNOWN_KEY),
        (6, Reject.UNKNOWN_PEER),
        (21, Reject.AUTH),
        (HEADER_LEN, Reject.AUTH),
        (-1, Reject.AUTH),
    ],
    ids=["version", "flags", "key-id", "sender", "counter", "ciphertext", "tag"],
)
def test_tampered_packet_rejected(offset, reason):
    a, b, _ = pair()
    packet = bytearray(a.seal(B_ID, b"payload" * 10))
    packet[offset] ^= 0x04  # counter 1 -> 5: unseen, so only the tag can refuse it
    before = window_state(b)
    assert b.open(bytes(packet)) is None and b.last_reject is reason
    assert window_state(b) == before
    assert b.open(a.seal(B_ID, b"next")) == (A_ID, b"next")  # the channel still works


def test_short_and_unknown_peer():
    a, b, _ = pair()
    assert b.open(b"") is None and b.last_reject is Reject.SHORT
    assert b.open(a.seal(B_ID, b"")[:-1]) is None and b.last_reject is Reject.SHORT
    c = PacketSealer(C_ID)
    exchange(c, a)
    assert b.open(c.seal(A_ID, b"not for b")) is None
    assert b.last_reject is Reject.UNKNOWN_PEER


def test_reordering_within_window_accepted_old_counter_rejected():
    a, b, _ = pair(PacketAuthConfig(replay_window=64))
    packets = [a.seal(B_ID, str(i).encode()) for i in range(200)]
    late = packets[100]
    order = packets[:100] + packets[101:200]
    random.Random(1).shuffle(order[100:])  # reorder the tail within the 64-packet window
    for p in packets[:100]:
        assert b.open(p) is not None
    assert b.open(packets[120]) is not None  # top = 121
    assert b.open(packets[60]) is None and b.last_reject is Reject.REPLAY  # seen, in window
    assert b.open(packets[110]) is not None  # unseen, within window
    assert b.open(late) is not None  # counter 101, still within 64 of 121
    for p in packets[121:200]:
        assert b.open(p) is not None  # top = 200
    before = window_state(b)
    assert b.open(packets[105]) is None and b.last_reject is Reject.TOO_OLD  # 101..106 < 200-64
    assert window_state(b) == before


def test_out_of_window_never_accepted_even_if_unseen():
    a, b, _ = pair()  # default window 1024
    first = a.seal(B_ID, b"first")
    for _ in range(1024):
        assert b.open(a.seal(B_ID, b"x")) is not None
    assert b.open(first) is None and b.last_reject is Reject.TOO_OLD


def test_rekey_grace():
    a, b, clock = pair(PacketAuthConfig(rekey_grace_s=30.0))
    old = [a.seal(B_ID, b"old%d" % i) for i in range(3)]
    assert b.open(old[0]) is not None
    exchange(b, a)  # rekey, initiated by the other side this time
    new = a.seal(B_ID, b"new")
    assert new[2:6] != old[0][2:6]  # new key id
    assert b.open(new) == (A_ID, b"new")
    assert b.open(old[1]) == (A_ID, b"old1")  # in flight before the rekey: accepted
    assert b.open(old[1]) is None and b.last_reject is Reject.REPLAY  # window kept per key
    clock.t += 31.0
    assert b.open(old[2]) is None and b.last_reject is Reject.UNKNOWN_KEY
    assert b.open(a.seal(B_ID, b"after")) == (A_ID, b"after")


def test_crossed_exchanges_converge():
    a = PacketSealer(A_ID)
    b = PacketSealer(B_ID)
    exchange(a, b)
    offer_a, offer_b = a.offer(B_ID), b.offer(A_ID)  # both start a push-pull at once
    answer_b = b.accept(A_ID, offer_a)
    answer_a = a.accept(B_ID, offer_b)
    a.complete(B_ID, answer_b)
    b.complete(A_ID, answer_a)
    assert a.current_epoch(B_ID) == b.current_epoch(A_ID) == 2
    assert a._by_id[B_ID].send_key_id == b._by_id[A_ID].recv.key_id
    assert b._by_id[A_ID].send_key_id == a._by_id[B_ID].recv.key_id


def test_restarted_peer_catches_up():
    a, b, _ = pair()
    for _ in range(3):
        exchange(a, b)
    assert b.current_epoch(A_ID) == 4
    a2 = PacketSealer(A_ID)  # a restarted: no keys, epoch 0
    exchange(a2, b)
    assert a2.current_epoch(B_ID) == b.current_epoch(A_ID) == 5
    assert b.open(a2.seal(B_ID, b"back")) == (A_ID, b"back")
    assert a2.open(b.seal(A_ID, b"hi")) == (B_ID, b"hi")


def test_key_management_errors():
    a, b, _ = pair()
    with pytest.raises(PacketAuthError):
        a.seal(C_ID, b"no key")
    with pytest.raises(PacketAuthError):
        a.complete(B_ID, KeyShare(9, bytes(32)))  # nothing pending
    with pytest.raises(PacketAuthError):
        a.accept(A_ID, KeyShare(1, bytes(32)))  # self
    assert a.has_key(B_ID)
    a.remove_peer(B_ID)
    assert not a.has_key(B_ID) and a.needs_rekey(B_ID)
    assert b.open(b"\x01" + bytes(60)) is None


def test_needs_rekey():
    a, b, clock = pair(PacketAuthConfig(rekey_after_s=100.0, rekey_after_packets=3))
    assert not a.needs_rekey(B_ID)
    for _ in range(3):
        a.seal(B_ID, b"")
    assert a.needs_rekey(B_ID)
    exchange(a, b)
    assert not a.needs_rekey(B_ID)
    clock.t += 100.0
    assert a.needs_rekey(B_ID)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_datagrams(data):
    _, b, _ = pair()
    before = window_state(b)
    assert b.open(data) is None
    assert sum(b.rejected.values()) == 1 and window_state(b) == before


_SEALERS = pair()


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_packets(data):
    a, b, _ = _SEALERS
    packet = bytearray(a.seal(B_ID, data.draw(st.binary(max_size=64))))
    original = bytes(packet)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(packet) - 1))
        packet[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        packet = packet[: data.draw(st.integers(0, len(packet)))]
    before = window_state(b)
    rejected = sum(b.rejected.values())
    if bytes(packet) == original:
        return
    assert b.open(bytes(packet)) is None
    assert window_state(b) == before and sum(b.rejected.values()) == rejected + 1
    assert b.open(original) is not None  # the genuine packet still gets through afterwards
