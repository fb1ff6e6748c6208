"""Authenticated, replay-protected UDP gossip packets (AES-256-GCM, per peer pair and direction).

Packet (big-endian):

    0       1         2              6                14               22
    | ver=1 | flags=0 | key id (4 B)  | sender (8 B)   | counter (u64)  | AES-GCM ct + 16 B tag
    header = bytes 0..22, authenticated as associated data; nonce = 4 zero bytes + counter

- sender = `short_key_id(node_id)` (first 8 bytes of the node id digest);
- key id names the sender->receiver key (derived with it), so the receiver needs no epoch
  agreement to pick the current key or a previous one still in its grace period;
- counter starts at 1 for every key and only grows, so (key, nonce) never repeats: each
  direction has its own key, and a restarted node always derives a fresh key.

Key exchange (over the authenticated mTLS push-pull; pure functions of the exchanged values):
initiator `offer(peer)` -> KeyShare(epoch, 32 random bytes); responder `accept(peer, offer)` ->
KeyShare(epoch', its 32 random bytes), installs; initiator `complete(peer, answer)`, installs.
    keys = HKDF-SHA256(salt = "meshnode-gossip-v1" | sorted(node ids),
                       ikm  = initiator share | responder share,
                       info = epoch (u64), length 72)
         = key i->r (32) | key r->i (32) | exchange id (8)
and key id = SHA-256(key)[:4]. epoch' = max(offered epoch, responder's current epoch + 1), so a
restarted node catches up. Install rule per peer: a higher epoch becomes current; at an equal
epoch (two exchanges crossed) the lower exchange id wins on both sides; the key that loses, and
the replaced one, stay receivable for `rekey_grace_s`.

Cost of a forged datagram: length and header checks, one dict lookup, a key-id compare, a replay
window check, and at most one AES-GCM tag check (~2 us per KB); no signature, no allocation that
outlives the call. The replay window changes only after the tag verifies. Rejects are counted in
`PacketSealer.rejected` by `Reject` reason, never logged one by one.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshnode.mesh.crypto_errors import PacketAuthError
from meshnode.mesh.identity import is_key_id, short_key_id

__all__ = [
    "HEADER_LEN",
    "OVERHEAD",
    "KeyShare",
    "PacketAuthConfig",
    "PacketSealer",
    "PairKeys",
    "Reject",
    "derive_pair_keys",
]

log = structlog.get_logger(__name__)

VERSION = 1
_HEADER = struct.Struct(">BB4s8sQ")
HEADER_LEN = _HEADER.size  # 22
TAG_LEN = 16
OVERHEAD = HEADER_LEN + TAG_LEN
_NONCE_PAD = b"\0\0\0\0"
_MAX_COUNTER = 2**64 - 1
_SALT = b"meshnode-gossip-v1"
_MAX_GRACE_KEYS = 4


class Reject(enum.StrEnum):
    SHORT = "short"  # shorter than header + tag
    HEADER = "header"  # unknown version or nonzero flags
    UNKNOWN_PEER = "unknown_peer"  # no key with this sender
    UNKNOWN_KEY = "unknown_key"  # key id neither current nor in its grace period
    REPLAY = "replay"  # counter already seen
    TOO_OLD = "too_old"  # counter below the replay window
    AUTH = "auth"  # AES-GCM tag invalid: forged or corrupted


@dataclass(frozen=True, slots=True)
class PacketAuthConfig:
    """Gossip packet authentication settings."""

    # Counters remembered per key (bits). Larger tolerates more reordering; 1024 covers a burst
    # of 1024 packets overtaking each other, far beyond what UDP on a LAN does.
    replay_window: int = 1024
    # Seconds a replaced key stays receivable: covers packets in flight and the moment between
    # the responder's and the initiator's install. Longer keeps a compromised old key alive.
    rekey_grace_s: float = 60.0
    # needs_rekey() turns true after this many seconds or packets sent under one key.
    rekey_after_s: float = 3600.0
    rekey_after_packets: int = 2**32


@dataclass(frozen=True, slots=True)
class KeyShare:
    """One side's contribution to a pair key, carried in the mTLS push-pull."""

    epoch: int
    share: bytes = field(repr=False)  # 32 random bytes


@dataclass(frozen=True, slots=True)
class PairKeys:
    """Keys of one exchange, from the point of view of one node."""

    epoch: int
    exchange_id: bytes
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def derive_pair_keys(
    local_id: str,
    peer_id: str,
    initiator_share: bytes,
    responder_share: bytes,
    epoch: int,
    *,
    local_is_initiator: bool,
) -> PairKeys:
    """The pair keys both ends derive from one exchange (see the module docstring)."""
    if local_id == peer_id or not (is_key_id(local_id) and is_key_id(peer_id)):
        raise PacketAuthError("need two distinct node ids")
    if len(initiator_share) != 32 or len(responder_share) != 32 or not 0 <= epoch < 2**64:
        raise PacketAuthError("key shares must be 32 bytes and epoch a u64")
    low, high = sorted((local_id, peer_id))
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=72,
        salt=_SALT + low.encode() + high.encode(),
        info=epoch.to_bytes(8, "big"),
    ).derive(initiator_share + responder_share)
    i2r, r2i, exchange_id = okm[:32], okm[32:64], okm[64:]
    send, recv = (i2r, r2i) if local_is_initiator else (r2i, i2r)
    return PairKeys(epoch=epoch, exchange_id=exchange_id, send_key=send, recv_key=recv)


class _RecvKey:
    __slots__ = ("aead", "bits", "expires", "key_id", "top")

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.key_id = _key_id(key)
        self.top = 0  # highest counter accepted
        self.bits = 1  # bit i set: counter top - i seen; counter 0 is never valid
        self.expires = float("inf")


class _Peer:
    __slots__ = (
        "created",
        "epoch",
        "exchange_id",
        "grace",
        "node_id",
        "recv",
        "send_aead",
        "send_counter",
        "send_key_id",
    )

    def __init__(self, node_id: str, keys: PairKeys, now: float) -> None:
        self.node_id = node_id
        self.epoch = keys.epoch
        self.exchange_id = keys.exchange_id
        self.send_aead = AESGCM(keys.send_key)
        self.send_key_id = _key_id(keys.send_key)
        self.send_counter = 0
        self.recv = _RecvKey(keys.recv_key)
        self.grace: list[_RecvKey] = []
        self.created = now


class PacketSealer:
    """Seals and opens gossip datagrams for one local node. Not thread-safe (one event loop)."""

    def __init__(
        self,
        local_id: str,
        config: PacketAuthConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_id = local_id
        self.config = config or PacketAuthConfig()
        self._short = short_key_id(local_id)
        self._clock = clock
        self._mask = (1 << self.config.replay_window) - 1
        self._window = self.config.replay_window
        self._peers: dict[bytes, _Peer] = {}  # by short id (open)
        self._by_id: dict[str, _Peer] = {}  # same objects by node id (seal)
        self._pending: dict[str, KeyShare] = {}  # offers awaiting an answer, by peer id
        self.rejected: dict[str, int] = {r.value: 0 for r in Reject}
        self.last_reject: Reject | None = None

    # -- key exchange ---------------------------------------------------------------------------

    def current_epoch(self, peer_id: str) -> int:
        peer = self._by_id.get(peer_id)
        return 0 if peer is None else peer.epoch

    def offer(self, peer_id: str) -> KeyShare:
        """Initiator: our share for `peer_id`, sent in the push-pull request."""
        share = KeyShare(epoch=self.current_epoch(peer_id) + 1, share=os.urandom(32))
        self._pending[peer_id] = share
        return share

    def accept(self, peer_id: str, offer: KeyShare) -> KeyShare:
        """Responder: install the keys from the initiator's offer; return our share."""
        epoch = max(offer.epoch, self.current_epoch(peer_id) + 1)
        answer = KeyShare(epoch=epoch, share=os.urandom(32))
        self.install(
            peer_id,
            derive_pair_keys(
                self.local_id, peer_id, offer.share, answer.share, epoch, local_is_initiator=False
            ),
        )
        return answer

    def complete(self, peer_id: str, answer: KeyShare) -> None:
        """Initiator: install the keys once the responder's answer arrives."""
        offer = self._pending.pop(peer_id, None)
        if offer is None:
            raise PacketAuthError(f"no key offer pending for {peer_id}")
        if answer.epoch < offer.epoch:
            raise PacketAuthError("answer epoch below the offered epoch")
        self.install(
            peer_id,
            derive_pair_keys(
                self.local_id,
                peer_id,
                offer.share,
                answer.share,
                answer.epoch,
                local_is_initiator=True,
            ),
        )

    def install(self, peer_id: str, keys: PairKeys) -> None:
        """Install keys for `peer_id` by the epoch rule of the module docstring."""
        if peer_id == self.local_id:
            raise PacketAuthError("cannot install a key for the local node")
        short, now = short_key_id(peer_id), self._clock()
        old = self._peers.get(short)
        if old is not None and old.node_id != peer_id:
            raise PacketAuthError(f"short id collision: {peer_id} and {old.node_id}")
        new = _Peer(peer_id, keys, now)
        if old is None:
            self._peers[short] = self._by_id[peer_id] = new
        elif keys.epoch > old.epoch or (
            keys.epoch == old.epoch and keys.exchange_id < old.exchange_id
        ):
            new.grace = old.grace
            self._retire(new, old.recv, now)
            self._peers[short] = self._by_id[peer_id] = new
        else:  # older epoch, or a crossed exchange that lost the tie: receive-only for a while
            self._retire(old, new.recv, now)
            return
        log.debug("packet_auth.installed", peer=peer_id, epoch=keys.epoch)

    def _retire(self, peer: _Peer, key: _RecvKey, now: float) -> None:
        key.expires = now + self.config.rekey_grace_s
        grace = [
            k
            for k in peer.grace
            if k.expires > now and k.key_id not in (key.key_id, peer.recv.key_id)
        ]
        if key.key_id != peer.recv.key_id:
            grace.append(key)
        peer.grace = grace[-_MAX_GRACE_KEYS:]

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer's keys (it left, died or was revoked)."""
        if self._by_id.pop(peer_id, None) is not None:
            del self._peers[short_key_id(peer_id)]
        self._pending.pop(peer_id, None)

    def has_key(self, peer_id: str) -> bool:
        return peer_id in self._by_id

    def needs_rekey(self, peer_id: str) -> bool:
        """True when there is no key for `peer_id`, or the current one is old or worn."""
        peer = self._by_id.get(peer_id)
        return (
            peer is None
            or self._clock() - peer.created >= self.config.rekey_after_s
            or peer.send_counter >= self.config.rekey_after_packets
        )

    # -- datagrams ------------------------------------------------------------------------------

    def seal(self, peer_id: str, plaintext: bytes) -> bytes:
        """Encrypt and authenticate `plaintext` for `peer_id`; PacketAuthError if no key."""
        peer = self._by_id.get(peer_id)
        if peer is None:
            raise PacketAuthError(f"no packet key for {peer_id}")
        if peer.send_counter >= _MAX_COUNTER:
            raise PacketAuthError(f"packet counter exhausted for {peer_id}: rekey")
        peer.send_counter += 1
        header = _HEADER.pack(VERSION, 0, peer.send_key_id, self._short, peer.send_counter)
        return header + peer.send_aead.encrypt(_NONCE_PAD + header[14:], plaintext, header)

    def open(self, datagram: bytes) -> tuple[str, bytes] | None:
        """(sender node id, plaintext), or None when rejected: the reason is counted in
        `rejected` and kept in `last_reject`. Never raises on input; state changes only for an
        authentic, fresh packet."""
        result = self._open(datagram)
        if type(result) is Reject:
            self.rejected[result] += 1
            self.last_reject = result
            return None
        return result  # type: ignore[return-value]

    def _open(self, d: bytes) -> tuple[str, bytes] | Reject:
        if len(d) < OVERHEAD:
            return Reject.SHORT
        version, flags, key_id, sender, counter = _HEADER.unpack_from(d)
        if version != VERSION or flags:
            return Reject.HEADER
        peer = self._peers.get(sender)
        if peer is None:
            return Reject.UNKNOWN_PEER
        key = peer.recv
        if key.key_id != key_id:
            key = None
            now = self._clock()
            for k in peer.grace:
                if k.key_id == key_id and k.expires > now:
                    key = k
                    break
            if key is None:
                return Reject.UNKNOWN_KEY
        top = key.top
        if counter <= top:
            if top - counter >= self._window:
                return Reject.TOO_OLD
            if (key.bits >> (top - counter)) & 1:
                return Reject.REPLAY
        try:
            plaintext = key.aead.decrypt(
                _NONCE_PAD + d[14:HEADER_LEN], d[HEADER_LEN:], d[:HEADER_LEN]
            )
        except InvalidTag:
            return Reject.AUTH
        if counter > top:  # commit only now that the packet is authentic
            key.bits = ((key.bits << (counter - top)) | 1) & self._mask
            key.top = counter
        else:
            key.bits |= 1 << (top - counter)
        return peer.node_id, plaintext
