"""The cluster's revocation list: CA-signed, sequence-numbered, gossiped and stored by every node.

Format (choice): a msgspec msgpack envelope `[body, signature]`, where `body` is the msgpack of
`{cluster_id, sequence, issued_at, serials, node_ids}` and `signature` is the CA's Ed25519
signature over `b"meshnode-revocation-v1\\0" + body`. Not an X.509 CRL, because:
- it revokes node ids as well as serials: a node id covers every certificate of that key,
  including renewals the revoker has not seen (X.509 CRLs list serials only);
- the signature covers the exact bytes received, so verify needs no re-encoding, and decoding
  attacker-supplied gossip goes through msgspec's strict typed decoder rather than an ASN.1 parser;
- it is a few bytes per entry and needs no CRL distribution machinery.
Serials are lowercase hex strings: X.509 serials are up to 159 bits, msgpack integers 64.

Merge rule: a verified list with a higher `sequence` replaces the current one; lower or equal is
ignored. The CA holder makes each new list with `RevocationList.revoke(ca, prior, ...)`, which
takes the union with `prior` and increments its sequence, so lists only grow.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshnode.mesh.crypto_errors import RevocationFormatError, RevocationSignatureError
from meshnode.mesh.identity import is_key_id, key_id, raw_public_key
from meshnode.mesh.securefile import ensure_private_dir, read_public, replace_file

if TYPE_CHECKING:
    from meshnode.mesh.certs import ClusterCA

__all__ = [
    "REVOCATION_FILE",
    "RevocationList",
    "load_revocation",
    "merge_revocations",
    "save_revocation",
]

log = structlog.get_logger(__name__)

REVOCATION_FILE = "revocation.bin"
_DOMAIN = b"meshnode-revocation-v1\0"
_MAX_BYTES = 4 << 20
_MAX_ENTRIES = 100_000
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    cluster_id: str
    sequence: int
    issued_at: float  # unix seconds, informational
    serials: tuple[str, ...] = ()  # lowercase hex, sorted, unique
    node_ids: tuple[str, ...] = ()  # sorted, unique


class _Envelope(msgspec.Struct, frozen=True, array_like=True, tag="rl1"):
    body: bytes
    signature: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode_env = msgspec.msgpack.Decoder(_Envelope).decode
_decode_body = msgspec.msgpack.Decoder(_Body).decode


class RevocationList:
    """A parsed revocation list; `verify()` before trusting it (verify_node_cert does)."""

    __slots__ = (
        "_data",
        "_env",
        "_verified_key",
        "cluster_id",
        "issued_at",
        "node_ids",
        "sequence",
        "serials",
    )

    def __init__(self, data: bytes, env: _Envelope, body: _Body) -> None:
        self._data = data
        self._env = env
        self._verified_key: bytes | None = None
        self.cluster_id = body.cluster_id
        self.sequence = body.sequence
        self.issued_at = body.issued_at
        self.serials = frozenset(int(s, 16) for s in body.serials)
        self.node_ids = frozenset(body.node_ids)

    def __repr__(self) -> str:
        return (
            f"RevocationList(cluster={self.cluster_id}, sequence={self.sequence}, "
            f"serials={len(self.serials)}, node_ids={len(self.node_ids)})"
        )

    @classmethod
    def create(
        cls,
        ca: ClusterCA,
        *,
        sequence: int,
        serials: Iterable[int] = (),
        node_ids: Iterable[str] = (),
        now: float | None = None,
    ) -> RevocationList:
        """Sign a list with exactly these entries (prefer `revoke`: it keeps sequences rising)."""
        if not 1 <= sequence < 2**63:
            raise ValueError("sequence must be in 1..2**63-1")
        ids = tuple(sorted(set(node_ids)))
        if not all(is_key_id(n) for n in ids):
            raise ValueError(f"not node ids: {ids}")
        hex_serials = tuple(f"{s:x}" for s in sorted(set(serials)))
        if not all(_SERIAL_RE.fullmatch(s) for s in hex_serials):
            raise ValueError("serials must be positive and at most 159 bits")
        body = _encode(
            _Body(
                cluster_id=ca.cluster_id,
                sequence=sequence,
                issued_at=time.time() if now is None else now,
                serials=hex_serials,
                node_ids=ids,
            )
        )
        env = _Envelope(body=body, signature=ca.private_key.sign(_DOMAIN + body))
        rl = cls.from_bytes(_encode(env))
        rl._verified_key = raw_public_key(ca.public_key)
        return rl

    @classmethod
    def revoke(
        cls,
        ca: ClusterCA,
        prior: RevocationList | None,
        *,
        serials: Iterable[int] = (),
        node_ids: Iterable[str] = (),
        now: float | None = None,
    ) -> RevocationList:
        """The next list: `prior`'s entries plus these, with sequence prior.sequence + 1."""
        if prior is not None:
            prior.verify(ca.public_key)
        rl = cls.create(
            ca,
            sequence=1 if prior is None else prior.sequence + 1,
            serials=set(serials) | (prior.serials if prior else frozenset()),
            node_ids=set(node_ids) | (prior.node_ids if prior else frozenset()),
            now=now,
        )
        log.info(
            "revocation.issued",
            cluster=ca.cluster_id,
            sequence=rl.sequence,
            serials=len(rl.serials),
            node_ids=len(rl.node_ids),
        )
        return rl

    def to_bytes(self) -> bytes:
        return self._data

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse (not verify). Raises RevocationFormatError for anything malformed."""
        if not isinstance(data, bytes) or len(data) > _MAX_BYTES:
            raise RevocationFormatError("revocation list: wrong type or too large")
        try:
            env = _decode_env(data)
            body = _decode_body(env.body)
        except (msgspec.DecodeError, ValueError) as e:  # msgspec raises UnicodeDecodeError too
            raise RevocationFormatError(f"revocation list: {e}") from None
        if not (
            is_key_id(body.cluster_id)
            and 1 <= body.sequence < 2**63
            and len(body.serials) + len(body.node_ids) <= _MAX_ENTRIES
            and all(_SERIAL_RE.fullmatch(s) for s in body.serials)
            and all(is_key_id(n) for n in body.node_ids)
        ):
            raise RevocationFormatError("revocation list: field out of range")
        return cls(data, env, body)

    @property
    def verified(self) -> bool:
        return self._verified_key is not None

    def verify(self, ca_public_key: Ed25519PublicKey) -> None:
        """Check the CA signature and that the list is for this CA's cluster (cached per key).

        Raises RevocationSignatureError.
        """
        raw = raw_public_key(ca_public_key)
        if self._verified_key == raw:
            return
        if self.cluster_id != key_id(raw):
            raise RevocationSignatureError(
                f"revocation list is for cluster {self.cluster_id}, not {key_id(raw)}"
            )
        try:
            ca_public_key.verify(self._env.signature, _DOMAIN + self._env.body)
        except InvalidSignature:
            raise RevocationSignatureError("revocation list not signed by the cluster CA") from None
        self._verified_key = raw

    def is_revoked(self, *, serial: int | None = None, node_id: str | None = None) -> bool:
        return serial in self.serials or node_id in self.node_ids


def merge_revocations(
    current: RevocationList | None,
    incoming: RevocationList | bytes,
    ca_public_key: Ed25519PublicKey,
) -> RevocationList:
    """The list to keep: `incoming` if verified and its sequence is higher, else `current`.

    Returns `current` itself (identity) when nothing changes, so `merged is not current` means
    "adopt, persist, re-gossip, drop sessions of newly revoked nodes". Raises
    RevocationFormatError / RevocationSignatureError for a bad `incoming`; `current` is untouched.
    """
    if isinstance(incoming, bytes):
        incoming = RevocationList.from_bytes(incoming)
    if current is not None and incoming.sequence <= current.sequence:
        return current
    incoming.verify(ca_public_key)
    log.info(
        "revocation.updated",
        cluster=incoming.cluster_id,
        sequence=incoming.sequence,
        previous=None if current is None else current.sequence,
    )
    return incoming


def save_revocation(data_dir: str | os.PathLike[str], revocation: RevocationList) -> Path:
    """Atomically write the list to `<data_dir>/revocation.bin`."""
    path = ensure_private_dir(data_dir) / REVOCATION_FILE
    replace_file(path, revocation.to_bytes(), 0o644)
    return path


def load_revocation(
    data_dir: str | os.PathLike[str], ca_public_key: Ed25519PublicKey
) -> RevocationList | None:
    """The verified list stored in `data_dir`, or None if there is none.

    Raises RevocationFormatError / RevocationSignatureError for a damaged or foreign file.
    """
    try:
        data = read_public(Path(data_dir) / REVOCATION_FILE, limit=_MAX_BYTES)
    except FileNotFoundError:
        return None
    rl = RevocationList.from_bytes(data)
    rl.verify(ca_public_key)
    return rl
