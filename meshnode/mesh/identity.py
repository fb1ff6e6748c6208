"""A node's own Ed25519 key, kept in its data dir, and the id derived from it.

Id scheme (node ids and cluster ids alike):

    key_id(raw_public_key) = base32_lower_nopad(sha256(raw_public_key)[:16])   # 26 chars [a-z2-7]

128 bits: collisions need ~2**64 keys; second preimages (impersonation) need ~2**128 work. The raw
public key is the 32-byte Ed25519 encoding (RFC 8032). `short_key_id` (the first 8 digest bytes)
names a sender inside gossip packets.

The key file is `<data_dir>/node_key.pem`: unencrypted PKCS#8 PEM, mode 0600, created atomically on
first start. A node must start unattended, so its key has no passphrase; file permissions guard it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshnode.mesh.crypto_errors import FileCorruptError
from meshnode.mesh.securefile import create_private, ensure_private_dir, read_private

__all__ = [
    "KEY_FILE_NAME",
    "NodeIdentity",
    "is_key_id",
    "key_id",
    "key_id_digest",
    "raw_public_key",
    "short_key_id",
]

log = structlog.get_logger(__name__)

KEY_FILE_NAME = "node_key.pem"
_ID_BYTES = 16
_ID_RE = re.compile(r"[a-z2-7]{26}")


def raw_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The 32-byte raw encoding of an Ed25519 public key (of a private key's public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_digest(raw_public: bytes) -> bytes:
    """The 16 digest bytes behind a key id."""
    return hashlib.sha256(raw_public).digest()[:_ID_BYTES]


def key_id(raw_public: bytes) -> str:
    """Node id / cluster id of a raw Ed25519 public key (see the module docstring)."""
    return base64.b32encode(key_id_digest(raw_public)).decode("ascii").rstrip("=").lower()


def is_key_id(text: str) -> bool:
    """True if `text` has the shape of a key id (26 chars of lowercase base32)."""
    return _ID_RE.fullmatch(text) is not None


def short_key_id(node_id: str) -> bytes:
    """First 8 digest bytes of a key id: the sender field of a gossip packet."""
    if not is_key_id(node_id):
        raise ValueError(f"not a node id: {node_id!r}")
    return base64.b32decode(node_id.upper() + "======")[:8]


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's Ed25519 key pair and its node id."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key_bytes: bytes
    node_id: str

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> NodeIdentity:
        raw = raw_public_key(private_key)
        return cls(private_key=private_key, public_key_bytes=raw, node_id=key_id(raw))

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity held in memory only (tests, or `issue_node_bundle`)."""
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> NodeIdentity:
        """Load `<data_dir>/node_key.pem`, creating it (mode 0600) on first start.

        Raises FilePermissionError if the file is accessible to group/others, a symlink, or not a
        regular file; FileCorruptError if it is not an unencrypted Ed25519 PKCS#8 PEM key. A
        corrupt key is never replaced silently: the node id would change under the cluster's feet.
        """
        path = ensure_private_dir(data_dir) / KEY_FILE_NAME
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if not create_private(path, pem):  # another process won the race: use its key
            return cls._load(path)
        identity = cls.from_private_key(key)
        log.info("identity.created", node=identity.node_id, path=str(path))
        return identity

    @classmethod
    def _load(cls, path: Path) -> NodeIdentity:
        data = read_private(path, limit=64 * 1024)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise FileCorruptError(f"{path}: node key is encrypted; it must not be") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise FileCorruptError(f"{path}: not a PEM private key ({type(e).__name__})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise FileCorruptError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        return cls.from_private_key(key)
