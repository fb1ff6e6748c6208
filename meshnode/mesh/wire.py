"""Wire format of the membership protocol: msgpack via msgspec, tagged frozen Structs.

Every UDP datagram and every TCP frame body is one ``Packet``::

    Packet = [version, cluster, msg]         msg = [tag, field, field, ...]

``msg`` is one message, or a ``Compound`` holding several (piggybacked gossip). A datagram is at
most ``MeshConfig.udp_buffer`` bytes (1400). A TCP frame is a 4-byte big-endian length followed by
the Packet, capped by ``MeshConfig.stream_max_bytes``; only ``PushPull`` travels over TCP.

Evolution rules (the wire is the protocol): ONLY APPEND. Tags are never renamed or reused;
fields are only appended at the end of a Struct, and every appended field has a default, so an
old node decodes a new message (extra trailing fields are ignored) and a new node decodes an
old one (missing trailing fields take their default). A change that cannot follow these rules
raises PROTOCOL_VERSION; packets outside [PROTOCOL_MIN, PROTOCOL_VERSION] are dropped.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Final, TypeAlias

import msgspec
from msgspec import Meta, Struct

from .errors import DecodeError

__all__ = [
    "FRAME_HEADER",
    "PROTOCOL_VERSION",
    "Ack",
    "Addr",
    "Alive",
    "Compound",
    "Dead",
    "MemberState",
    "Msg",
    "Nack",
    "NodeState",
    "Packet",
    "Ping",
    "PingReq",
    "PushPull",
    "Suspect",
    "decode_frame_length",
    "decode_packet",
    "encode_msg",
    "encode_packet",
    "frame",
    "pack",
]

PROTOCOL_VERSION: Final = 1  # the version this code speaks and sends
PROTOCOL_MIN: Final = 1      # the oldest version it still accepts

# Hard limits, enforced when decoding whatever the configuration says.
ID_MAX: Final = 64           # node id, characters (a hash in hex or base32)
NAME_MAX: Final = 64         # node name, characters
HOST_MAX: Final = 64         # advertised host (an IP address, or a short host name)
CLUSTER_MAX: Final = 64      # cluster id, characters
META_MAX_BYTES: Final = 1024
LOAD_MAX_BYTES: Final = 512
COMPOUND_MAX: Final = 255    # messages in one Compound
STATES_MAX: Final = 65535    # members in one PushPull
UDP_MIN_BYTES: Final = 512
UDP_MAX_BYTES: Final = 65507  # largest IPv4 UDP payload

U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
NodeId = Annotated[str, Meta(min_length=1, max_length=ID_MAX)]
Name = Annotated[str, Meta(max_length=NAME_MAX)]
Host = Annotated[str, Meta(min_length=1, max_length=HOST_MAX)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Addr: TypeAlias = tuple[Host, Port]
MetaBytes = Annotated[bytes, Meta(max_length=META_MAX_BYTES)]
LoadBytes = Annotated[bytes, Meta(max_length=LOAD_MAX_BYTES)]


class MemberState(enum.IntEnum):
    """State of a member. The numbers are part of the protocol: ONLY APPEND."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class _Msg(Struct, frozen=True, array_like=True, tag_field="t"):
    pass


# ---- ONLY APPEND: message types, their tags, and their fields. -------------------------------

class Ping(_Msg, frozen=True, tag="ping"):
    """Direct probe. ``target`` is the node id the sender means, so a new process that took over
    the address does not answer for the old one."""

    seq: U32
    target: NodeId


class Ack(_Msg, frozen=True, tag="ack"):
    """Answer to a Ping (or forwarded by a ping-req relay). Carries the probed node's load,
    ordered by (inc, load_version) so a stale load never replaces a newer one."""

    seq: U32
    inc: U32 = 0
    load: LoadBytes = b""
    load_version: U63 = 0


class Nack(_Msg, frozen=True, tag="nack"):
    """From a ping-req relay whose own ping got no ack within probe_timeout: tells the prober
    that the relay is alive (Lifeguard uses missing nacks as a sign of local trouble)."""

    seq: U32


class PingReq(_Msg, frozen=True, tag="preq"):
    """Ask the receiver to ping ``target`` at ``addr`` and forward the ack (ping-req)."""

    seq: U32
    target: NodeId
    addr: Addr
    nack: bool = True


class Alive(_Msg, frozen=True, tag="alive"):
    """The node ``node`` is alive at incarnation ``inc``. Only the node itself raises ``inc``."""

    inc: U32
    node: NodeId
    name: Name
    addr: Addr
    meta: MetaBytes = b""


class Suspect(_Msg, frozen=True, tag="suspect"):
    """``src`` suspects ``node`` at incarnation ``inc``."""

    inc: U32
    node: NodeId
    src: NodeId


class Dead(_Msg, frozen=True, tag="dead"):
    """``src`` declares ``node`` dead at ``inc``. ``src == node`` means it left gracefully."""

    inc: U32
    node: NodeId
    src: NodeId


Msg: TypeAlias = Ping | Ack | Nack | PingReq | Alive | Suspect | Dead


class Compound(_Msg, frozen=True, tag="compound"):
    """Several messages in one datagram (a probe message plus piggybacked gossip)."""

    msgs: Annotated[tuple[Msg, ...], Meta(max_length=COMPOUND_MAX)]


class NodeState(Struct, frozen=True, array_like=True):
    """One member in a push-pull exchange."""

    node: NodeId
    name: Name
    addr: Addr
    meta: MetaBytes
    inc: U32
    state: MemberState
    load: LoadBytes = b""
    load_version: U63 = 0


class PushPull(_Msg, frozen=True, tag="pushpull"):
    """Full-state exchange over TCP. ``reply`` is False on the request, True on the answer;
    ``join`` marks the exchange that joins a node to the cluster."""

    join: bool
    reply: bool
    states: Annotated[tuple[NodeState, ...], Meta(max_length=STATES_MAX)]


class Packet(Struct, frozen=True, array_like=True):
    """Envelope of every datagram and frame: protocol version, cluster id, one message."""

    version: int
    cluster: Annotated[str, Meta(max_length=CLUSTER_MAX)]
    msg: Msg | Compound | PushPull


class _Head(Struct, frozen=True, array_like=True):
    # The envelope's first two fields, read leniently to say *why* a packet was refused.
    version: int | str | None
    cluster: int | str | None


# ---- codec -----------------------------------------------------------------------------------

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Packet)
_head_decoder: Final = msgspec.msgpack.Decoder(_Head)

FRAME_HEADER: Final = struct.Struct(">I")
# What msgspec raises on bad input: DecodeError (ValidationError), UnicodeDecodeError (a
# ValueError) on invalid UTF-8, RecursionError on deeply nested arrays.
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)  # TCP frame: uint32 big-endian body length


def encode_msg(msg: Msg) -> bytes:
    """One message alone, as it sits inside a Packet or Compound (used to size broadcasts)."""
    return _encoder.encode(msg)


def encode_packet(cluster: str, msg: Msg | Compound | PushPull) -> bytes:
    return _encoder.encode(Packet(PROTOCOL_VERSION, cluster, msg))


def pack(cluster: str, msgs: list[Msg]) -> bytes:
    """One message as itself, several as a Compound."""
    return encode_packet(cluster, msgs[0] if len(msgs) == 1 else Compound(tuple(msgs)))


def envelope_size(cluster: str) -> int:
    """Bytes a Packet adds around its message (array header, version, cluster)."""
    return len(encode_packet(cluster, Nack(0))) - len(encode_msg(Nack(0)))


# Bytes a Compound adds around its messages: array header, tag, and the messages' array
# header at its largest (array16, 3 bytes, for 16 to 255 messages).
COMPOUND_OVERHEAD: Final = len(_encoder.encode(Compound(()))) + 2


def decode_packet(data: bytes, cluster: str, max_bytes: int) -> Msg | Compound | PushPull:
    """Decode one datagram or frame body of ``cluster``; raise DecodeError (never else)."""
    if len(data) > max_bytes:
        raise DecodeError("oversized", f"{len(data)} > {max_bytes} bytes")
    try:
        packet = _decoder.decode(data)
    except _DECODE_ERRORS as exc:
        _classify(data, cluster)
        raise DecodeError("malformed", str(exc)) from None
    if not PROTOCOL_MIN <= packet.version <= PROTOCOL_VERSION:
        raise DecodeError("version", f"version {packet.version}")
    if packet.cluster != cluster:
        raise DecodeError("cluster", "packet of another cluster")
    return packet.msg


def _classify(data: bytes, cluster: str) -> None:
    # A packet that does not decode may still be well-formed for another version or cluster.
    try:
        head = _head_decoder.decode(data)
    except _DECODE_ERRORS:
        return
    version = head.version
    if isinstance(version, int) and not PROTOCOL_MIN <= version <= PROTOCOL_VERSION:
        raise DecodeError("version", f"version {version}")
    if isinstance(head.cluster, str) and head.cluster != cluster:
        raise DecodeError("cluster", "packet of another cluster")


def frame(body: bytes) -> bytes:
    """A TCP frame: 4-byte big-endian length, then the body (an encoded Packet)."""
    return FRAME_HEADER.pack(len(body)) + body


def decode_frame_length(header: bytes, max_bytes: int) -> int:
    """Body length from a frame header; DecodeError if it is over ``max_bytes`` or empty."""
    if len(header) != FRAME_HEADER.size:
        raise DecodeError("frame", "short frame header")
    length: int = FRAME_HEADER.unpack(header)[0]
    if length > max_bytes:
        raise DecodeError("oversized", f"frame of {length} > {max_bytes} bytes")
    if length == 0:
        raise DecodeError("frame", "empty frame")
    return length


def largest_alive_packet(cluster_len: int = CLUSTER_MAX, meta_len: int = META_MAX_BYTES) -> int:
    """Size of a packet holding one Alive with every field at its limit, inside a Compound."""
    alive = Alive(0xFFFF_FFFF, "n" * ID_MAX, "m" * NAME_MAX, ("h" * HOST_MAX, 65535),
                  b"x" * meta_len)
    return len(encode_packet("c" * cluster_len, Compound((alive,)))) + 2
