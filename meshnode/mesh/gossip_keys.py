"""GossipKeys: the Mesh's packet sealer of a signed cluster (packet_auth over the mTLS path).

The Mesh seals by address; packet_auth keys by node id. `seal(data, addr)` maps the address to
the member last seen there (`Mesh.node_id_at`) and seals with that pair's AES-GCM key; `open`
needs no address (the packet names its sender, and only that sender's key opens it).

Key exchange: when a datagram is to go to a peer with no key (or whose key is due for rekey,
or whose last exchange failed), one exchange is started in the background over the mTLS gossip
TCP path (`Mesh.request`, refused unless the peer's certificate names that node):

    initiator                                   responder (Mesh on_request -> handle_request)
    KeyMsg(epoch, share)  ----- TLS 1.3 ----->  packet_auth.accept(peer id from its cert)
    packet_auth.complete  <-------------------  KeyMsg(epoch', share')

Invariants:
- at most one exchange per peer in flight; a failed one (lost answer, refused, timeout) is
  retried after `retry_s`, doubling to `retry_max_s`, whether or not an older key is still in
  use, so a lost answer never waits for the next push-pull;
- datagrams for a peer with no key yet are held (at most `HELD_MAX` per peer, the oldest
  dropped) and sent as soon as the key is installed, so joining costs no probe;
- the responder installs a new key, and may send under it, one round trip before the
  initiator does: while our offer to a peer is in flight, that peer's datagrams under a key we
  do not know yet are kept (at most `HELD_MAX`) and opened again once the answer is in, so a
  rekey loses no packet. Forged ones cost at most HELD_MAX more tag checks per exchange;
- a denied node (revoked) gets no datagram, no key, and none of its packets is opened.
Rejects are counted (packet_auth's `rejected` by reason, and `stats`), never logged one by one.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import structlog

from .crypto_errors import PacketAuthError
from .errors import MeshError
from .identity import short_key_id
from .packet_auth import HEADER_LEN, OVERHEAD, KeyShare, PacketAuthConfig, Reject
from .packet_auth import PacketSealer as PacketAuth
from .wire import Addr

if TYPE_CHECKING:
    from .transport import Mesh

__all__ = ["HELD_MAX", "GossipKeys", "KeyMsg"]

log = structlog.get_logger("meshnode.mesh")

HELD_MAX = 16  # datagrams held per peer while its key is being exchanged


class KeyMsg(msgspec.Struct, frozen=True, array_like=True, tag="kx1"):
    """A key share on the wire (offer and answer alike). ONLY APPEND fields."""

    epoch: int
    share: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(KeyMsg).decode


class GossipKeys:
    """A `transport.PacketSealer` for one node; call `attach(mesh)` before the mesh starts
    sending, and `close()` after the mesh closed. Not thread-safe (one event loop)."""

    overhead = OVERHEAD

    def __init__(self, local_id: str, config: PacketAuthConfig | None = None, *,
                 retry_s: float = 0.2, retry_max_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.auth = PacketAuth(local_id, config, clock=clock)
        self.local_id = local_id
        self.stats: Counter[str] = Counter()
        self.denied: set[str] = set()
        self._clock = clock
        self._retry_s, self._retry_max_s = retry_s, retry_max_s
        self._mesh: Mesh | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next_try: dict[str, float] = {}  # peer -> earliest clock() of the next exchange
        self._backoff: dict[str, float] = {}
        self._stale: set[str] = set()  # the last exchange failed: redo it even with a key
        self._held: dict[str, deque[tuple[bytes, Addr]]] = {}
        self._offering: dict[bytes, str] = {}  # short id -> peer, while our offer is in flight
        self._early: dict[str, deque[tuple[bytes, Addr, Reject]]] = {}

    def attach(self, mesh: Mesh) -> None:
        self._mesh = mesh

    async def close(self) -> None:
        """Cancel exchanges in flight; safe to call twice."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held.clear()

    # -- PacketSealer ---------------------------------------------------------------------

    def seal(self, data: bytes, addr: Addr) -> bytes | None:
        mesh = self._mesh
        peer = mesh.node_id_at(addr) if mesh is not None else None
        if peer is None:
            self.stats["seal.unknown_addr"] += 1
            return None
        if peer in self.denied:
            self.stats["seal.denied"] += 1
            return None
        auth = self.auth
        if peer in self._stale or auth.needs_rekey(peer):
            self._want(peer, addr)
        if not auth.has_key(peer):
            held = self._held.setdefault(peer, deque(maxlen=HELD_MAX))
            held.append((data, addr))
            self.stats["seal.held"] += 1
            return None
        try:
            return auth.seal(peer, data)
        except PacketAuthError:  # counter exhausted: rekey is already under way
            self.stats["seal.failed"] += 1
            return None

    def open(self, data: bytes, addr: Addr) -> bytes | None:
        opened = self.auth.open(data)
        if opened is None:
            if self._offering and self.auth.last_reject in (Reject.UNKNOWN_KEY,
                                                            Reject.UNKNOWN_PEER):
                self._keep_early(data, addr)
            return None
        sender, plaintext = opened
        if sender in self.denied:
            self.stats["open.denied"] += 1
            return None
        return plaintext

    @property
    def rejected(self) -> dict[str, int]:
        """Datagrams refused by reason (packet_auth.Reject values, plus `denied`)."""
        return {**self.auth.rejected, "denied": self.stats["open.denied"]}

    # -- peers ----------------------------------------------------------------------------

    def deny(self, node_id: str) -> None:
        """Never again exchange keys or packets with `node_id` (it was revoked)."""
        self.denied.add(node_id)
        self.auth.remove_peer(node_id)
        self._held.pop(node_id, None)
        self._stale.discard(node_id)
        task = self._tasks.pop(node_id, None)
        if task is not None:
            task.cancel()

    def handle_request(self, payload: bytes, peer_id: str | None, addr: Addr) -> bytes | None:
        """Responder side (the Mesh's on_request): answer a key offer from an authenticated
        peer. None (the connection is closed unanswered) for anything else."""
        if peer_id is None or peer_id == self.local_id or peer_id in self.denied:
            self.stats["kx.refused"] += 1
            return None
        try:
            offer = _decode(payload)
            answer = self.auth.accept(peer_id, KeyShare(epoch=offer.epoch, share=offer.share))
        except (msgspec.DecodeError, msgspec.ValidationError, PacketAuthError, ValueError):
            self.stats["kx.bad_offer"] += 1
            return None
        self.stats["kx.accepted"] += 1
        self._flush(peer_id)
        return _encode(KeyMsg(answer.epoch, answer.share))

    def _keep_early(self, data: bytes, addr: Addr) -> None:
        peer = self._offering.get(data[6:14]) if len(data) >= HEADER_LEN else None
        if peer is None:
            return
        reason = self.auth.last_reject
        assert reason is not None
        early = self._early.setdefault(peer, deque(maxlen=HELD_MAX))
        if len(early) == HELD_MAX:
            return  # full: this one stays rejected (and counted)
        early.append((data, addr, reason))
        self.auth.rejected[reason] -= 1  # not a reject yet: counted if the exchange fails
        self.stats["open.deferred"] += 1

    def _open_early(self, peer: str) -> None:
        early = self._early.pop(peer, None)
        mesh = self._mesh
        if not early or mesh is None:
            return
        for data, addr, _ in early:
            plaintext = self.open(data, addr)
            if plaintext is not None:
                mesh.deliver(plaintext, addr)

    def _want(self, peer: str, addr: Addr) -> None:
        if peer in self._tasks or self._clock() < self._next_try.get(peer, 0.0):
            return
        self._tasks[peer] = asyncio.get_running_loop().create_task(
            self._exchange(peer, addr), name=f"gossip-kx:{peer[:8]}")

    async def _exchange(self, peer: str, addr: Addr) -> None:
        mesh = self._mesh
        short = short_key_id(peer)
        self._offering[short] = peer
        try:
            assert mesh is not None
            offer = self.auth.offer(peer)
            reply = await mesh.request(addr, _encode(KeyMsg(offer.epoch, offer.share)),
                                       expect=peer)
            answer = _decode(reply)
            self.auth.complete(peer, KeyShare(epoch=answer.epoch, share=answer.share))
            del self._offering[short]
            self._open_early(peer)
        except (MeshError, OSError, TimeoutError, EOFError, PacketAuthError,
                msgspec.DecodeError, msgspec.ValidationError) as exc:
            backoff = min(self._backoff.get(peer, self._retry_s / 2) * 2, self._retry_max_s)
            self._backoff[peer] = backoff
            self._next_try[peer] = self._clock() + backoff
            self._stale.add(peer)
            self.stats["kx.failed"] += 1
            log.debug("gossip_keys.exchange_failed", peer=peer, retry_s=backoff,
                      error=repr(exc))
        else:
            self._backoff.pop(peer, None)
            self._next_try.pop(peer, None)
            self._stale.discard(peer)
            self.stats["kx.completed"] += 1
            self._flush(peer)
        finally:
            self._tasks.pop(peer, None)
            self._offering.pop(short, None)
            for _, _, reason in self._early.pop(peer, ()):  # the exchange failed
                self.auth.rejected[reason] += 1

    def _flush(self, peer: str) -> None:
        held = self._held.pop(peer, None)
        mesh = self._mesh
        if not held or mesh is None or not self.auth.has_key(peer):
            return
        for data, addr in held:
            mesh.send_sealed(self.auth.seal(peer, data), addr)
