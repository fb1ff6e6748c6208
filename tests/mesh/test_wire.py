"""Wire codec: round trips, size limits, refusal reasons, fuzzing, and pinned encodings."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.mesh import DecodeError, MeshConfig, wire
from meshnode.mesh.wire import (
    Ack,
    Alive,
    Compound,
    Dead,
    MemberState,
    Nack,
    NodeState,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

CLUSTER = "k5lq3fhuzyr4dxsmvmoejzfvna"

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=1, max_size=wire.ID_MAX)
names = st.text(max_size=wire.NAME_MAX)
u32 = st.integers(0, 2**32 - 1)
addrs = st.tuples(st.text(min_size=1, max_size=wire.HOST_MAX), st.integers(0, 65535))
metas = st.binary(max_size=wire.META_MAX_BYTES)
loads = st.binary(max_size=wire.LOAD_MAX_BYTES)

single = st.one_of(
    st.builds(Ping, u32, ids),
    st.builds(Ack, u32, u32, loads, st.integers(0, 2**63 - 1)),
    st.builds(Nack, u32),
    st.builds(PingReq, u32, ids, addrs, st.booleans()),
    st.builds(Alive, u32, ids, names, addrs, metas),
    st.builds(Suspect, u32, ids, ids),
    st.builds(Dead, u32, ids, ids),
)
states = st.builds(NodeState, ids, names, addrs, metas, u32, st.sampled_from(MemberState),
                   loads, st.integers(0, 2**63 - 1))
any_msg = st.one_of(
    single,
    st.builds(Compound, st.lists(single, max_size=8).map(tuple)),
    st.builds(PushPull, st.booleans(), st.booleans(), st.lists(states, max_size=5).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(any_msg)
def test_round_trip(msg: object) -> None:
    data = wire.encode_packet(CLUSTER, msg)  # type: ignore[arg-type]
    assert wire.decode_packet(data, CLUSTER, 1 << 20) == msg


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        wire.decode_packet(data, CLUSTER, 1400)
    except DecodeError as exc:
        assert exc.reason in {"oversized", "malformed", "version", "cluster"}


@settings(max_examples=500, deadline=None)
@given(any_msg, st.data())
def test_fuzz_mutated_packets_only_raise_decode_error(msg: object, data: st.DataObject) -> None:
    raw = bytearray(wire.encode_packet(CLUSTER, msg))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        match data.draw(st.sampled_from(["flip", "drop", "insert"])):
            case "flip":
                raw[i] ^= data.draw(st.integers(1, 255))
            case "drop":
                del raw[i]
            case "insert":
                raw.insert(i, data.draw(st.integers(0, 255)))
        if not raw:
            break
    try:
        wire.decode_packet(bytes(raw), CLUSTER, 1 << 20)
    except DecodeError:
        pass


def test_refusal_reasons() -> None:
    ok = wire.encode_packet(CLUSTER, Nack(1))
    assert wire.decode_packet(ok, CLUSTER, 1400) == Nack(1)
    cases = {
        "oversized": (b"\x00" * 1401, CLUSTER),
        "malformed": (b"\x93\x01", CLUSTER),
        "cluster": (ok, "another-cluster"),
        "version": (msgspec.msgpack.encode([99, CLUSTER, ["nack", 1]]), CLUSTER),
    }
    for reason, (data, cluster) in cases.items():
        with pytest.raises(DecodeError) as info:
            wire.decode_packet(data, cluster, 1400)
        assert info.value.reason == reason
    # A future version whose message we cannot parse is still refused as "version".
    future = msgspec.msgpack.encode([2, CLUSTER, ["teleport", {"x": 1}]])
    with pytest.raises(DecodeError, match="version"):
        wire.decode_packet(future, CLUSTER, 1400)
    # Unknown tag at our version: malformed.
    with pytest.raises(DecodeError, match="malformed"):
        wire.decode_packet(msgspec.msgpack.encode([1, CLUSTER, ["teleport", 1]]), CLUSTER, 1400)


def test_field_limits_are_enforced() -> None:
    too_long_meta = msgspec.msgpack.encode(
        [1, CLUSTER, ["alive", 1, "n", "x", ["h", 1], b"m" * (wire.META_MAX_BYTES + 1)]])
    bad_port = msgspec.msgpack.encode([1, CLUSTER, ["alive", 1, "n", "x", ["h", 70000], b""]])
    negative_inc = msgspec.msgpack.encode([1, CLUSTER, ["suspect", -1, "n", "s"]])
    empty_id = msgspec.msgpack.encode([1, CLUSTER, ["ping", 1, ""]])
    for data in (too_long_meta, bad_port, negative_inc, empty_id):
        with pytest.raises(DecodeError, match="malformed"):
            wire.decode_packet(data, CLUSTER, 1 << 16)


def test_tags_and_encoding_are_pinned() -> None:
    """ONLY APPEND: these bytes are the protocol. A change here breaks mixed clusters."""
    assert wire.encode_packet("c", Ping(7, "n")) == b"\x93\x01\xa1c\x93\xa4ping\x07\xa1n"
    compound = Compound((Alive(1, "n", "x", ("h", 1), b"m"), Suspect(2, "n", "s"),
                         Dead(3, "n", "s"), Ack(1, 2, b"l", 3), Nack(4),
                         PingReq(5, "t", ("h", 2), True)))
    assert wire.encode_packet("c", compound) == (
        b"\x93\x01\xa1c\x92\xa8compound\x96\x96\xa5alive\x01\xa1n\xa1x\x92\xa1h\x01\xc4\x01m"
        b"\x94\xa7suspect\x02\xa1n\xa1s\x94\xa4dead\x03\xa1n\xa1s\x95\xa3ack\x01\x02\xc4\x01l"
        b"\x03\x92\xa4nack\x04\x95\xa4preq\x05\xa1t\x92\xa1h\x02\xc3")
    tags = {cls.__struct_config__.tag for cls in
            (Ping, Ack, Nack, PingReq, Alive, Suspect, Dead, Compound, PushPull)}
    assert tags == {"ping", "ack", "nack", "preq", "alive", "suspect", "dead", "compound",
                    "pushpull"}
    assert [s.value for s in MemberState] == [0, 1, 2, 3]


def test_old_and_new_shapes_decode() -> None:
    """Appended fields have defaults: an older ack (no load) and a newer one (an extra
    trailing field) both decode."""
    old = msgspec.msgpack.encode([1, CLUSTER, ["ack", 5]])
    assert wire.decode_packet(old, CLUSTER, 1400) == Ack(5)
    new = msgspec.msgpack.encode([1, CLUSTER, ["ack", 5, 1, b"x", 2, "future-field"]])
    assert wire.decode_packet(new, CLUSTER, 1400) == Ack(5, 1, b"x", 2)


def test_largest_alive_fits_a_datagram() -> None:
    cfg = MeshConfig.lan()
    assert wire.largest_alive_packet(meta_len=cfg.meta_max_bytes) <= cfg.udp_buffer
    # The reserve left is what a packet sealer may add (AEAD header + tag is ~40 bytes).
    assert cfg.udp_buffer - wire.largest_alive_packet(meta_len=cfg.meta_max_bytes) >= 64


def test_pack_uses_compound_only_for_several() -> None:
    assert wire.decode_packet(wire.pack(CLUSTER, [Nack(1)]), CLUSTER, 1400) == Nack(1)
    both = wire.decode_packet(wire.pack(CLUSTER, [Nack(1), Nack(2)]), CLUSTER, 1400)
    assert both == Compound((Nack(1), Nack(2)))


def test_compound_overhead_bounds_real_packets() -> None:
    msgs = [Nack(i) for i in range(200)]
    size = len(wire.pack(CLUSTER, msgs))
    assert size <= (wire.envelope_size(CLUSTER) + wire.COMPOUND_OVERHEAD
                    + sum(len(wire.encode_msg(m)) for m in msgs))


def test_frames() -> None:
    body = wire.encode_packet(CLUSTER, PushPull(True, False, ()))
    frame = wire.frame(body)
    assert wire.decode_frame_length(frame[:4], 1 << 20) == len(body)
    assert frame[4:] == body
    with pytest.raises(DecodeError, match="oversized"):
        wire.decode_frame_length(wire.FRAME_HEADER.pack(1 << 30), 1 << 20)
    with pytest.raises(DecodeError, match="frame"):
        wire.decode_frame_length(wire.FRAME_HEADER.pack(0), 1 << 20)
    with pytest.raises(DecodeError, match="frame"):
        wire.decode_frame_length(b"\x00", 1 << 20)
