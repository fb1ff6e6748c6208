"""A node's cluster identity: CA, node certificate, key, revocation list; and the open-node rule.

`load_security(config)` runs before anything binds a port. With `ca_cert` and `cert` it loads
the CA certificate, the node certificate and the key (`key`, else the identity key in the data
dir), and refuses to start unless the certificate is valid now, signed by that CA, not revoked
by the list stored in the data dir, and issued for this key's node id. Without `ca_cert` the node
is open: `check_open_binding` refuses any address but loopback unless `insecure` is set.

`ClusterSecurity` then answers, for every node-to-node connection, "who is this peer, and may
it talk to us?" (`check_peer`: chain to the CA, SAN node and cluster id, expiry, revocation),
and holds the revocation list (`adopt_revocation`: verified, higher sequence wins, persisted).

Invariant (fail closed): a node with a cluster identity only ever builds TLS contexts that
require a certificate from its CA on both ends; no code path of it accepts a plain peer.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.mesh import Addr
from meshnode.mesh.certverify import (
    NodeCertInfo,
    aware_now,
    certificate_public_key,
    cluster_id_of,
    load_certificate,
    verify_node_cert,
)
from meshnode.mesh.crypto_errors import (
    CertificateError,
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertificateRevokedError,
    FileCorruptError,
    RevocationError,
    SecurityError,
)
from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.revocation import (
    RevocationList,
    load_revocation,
    merge_revocations,
    save_revocation,
)
from meshnode.mesh.securefile import read_private, read_public
from meshnode.mesh.tls import check_peer, client_context, server_context

from .config import NodeConfig
from .errors import ConfigError

__all__ = ["INTERNAL_REVOCATION_PATH", "ClusterSecurity", "check_open_binding", "is_loopback",
           "load_identity", "load_security"]

log = structlog.get_logger("meshnode.node")

_PEER_CACHE_MAX = 1024
INTERNAL_REVOCATION_PATH = "/internal/v1/revocation"


@functools.cache  # also asked on every API request (http/auth.py), about a few addresses
def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (a host name is not: it may resolve
    anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_open_binding(config: NodeConfig) -> None:
    """ConfigError for an open node (no `ca_cert`) bound beyond loopback without `insecure`."""
    if config.ca_cert or config.insecure:
        return
    exposed = [h for h in dict.fromkeys((config.host, config.bind or config.host))
               if not is_loopback(h)]
    if exposed:
        raise ConfigError(
            f"refusing to start an open node on {', '.join(exposed)}: without a cluster "
            "identity anyone who can reach these ports can join the cluster, read its gossip "
            "and use the API. Either start a signed node (`meshnode ca init`, then `meshnode "
            "cert issue ...` and `meshnode start --ca CA.pem --cert NODE.crt`), or bind "
            "loopback only (--host 127.0.0.1), or pass --insecure to run open anyway.")


def _read(path: str, what: str, private: bool = False) -> bytes:
    try:
        return read_private(path, limit=64 * 1024) if private else read_public(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except SecurityError as exc:
        raise ConfigError(f"{what} file {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None


def data_dir_identity(data_dir: str | os.PathLike[str]) -> NodeIdentity:
    """The key in `data_dir` (created on first start); ConfigError saying what to do when it
    is corrupt or open to others (it is never replaced: the node id would change)."""
    try:
        return NodeIdentity.load_or_create(data_dir)
    except FileCorruptError as exc:
        raise ConfigError(f"node key in {data_dir}: {exc}: restore it from a backup, or move "
                          "it away to start as a new node (with a new node id)") from None
    except SecurityError as exc:  # its mode: the message says which chmod
        raise ConfigError(f"node key in {data_dir}: {exc}") from None


def load_identity(config: NodeConfig) -> NodeIdentity:
    """The node's key: the `key` file if given, else the data dir's (created on first start)."""
    if not config.key:
        return data_dir_identity(config.data_dir)
    data = _read(config.key, "key", private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"key file {config.key} is encrypted; a node key must not be "
                          "(the node starts unattended; file permissions guard it)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"key file {config.key} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"key file {config.key} is not an Ed25519 key")
    return NodeIdentity.from_private_key(key)


def load_security(config: NodeConfig) -> ClusterSecurity | None:
    """The node's cluster identity, or None for an open node (checked by
    check_open_binding). ConfigError, saying what to do, for anything that does not hold."""
    check_open_binding(config)
    if not config.ca_cert and not config.cert:
        return None
    if not (config.ca_cert and config.cert):
        raise ConfigError("a signed node needs both --ca CA.pem and --cert NODE.crt "
                          f"(got only {'--ca' if config.ca_cert else '--cert'})")
    try:
        ca = load_certificate(_read(config.ca_cert, "CA certificate"))
        cert = load_certificate(_read(config.cert, "node certificate"))
    except CertificateError as exc:
        raise ConfigError(f"{exc}: --ca and --cert take PEM certificate files") from None
    identity = load_identity(config)
    try:
        revocation = load_revocation(config.data_dir, certificate_public_key(ca))
    except (RevocationError, SecurityError) as exc:
        raise ConfigError(f"revocation list in {config.data_dir}: {exc}; remove the file "
                          "to fetch the list from the cluster again") from None
    try:
        info = verify_node_cert(cert, ca, None, revocation)
    except CertificateExpiredError as exc:
        raise ConfigError(f"{config.cert}: {exc}. Renew it: `meshnode cert renew` on the CA "
                          "holder, then restart with the new certificate") from None
    except CertificateNotYetValidError as exc:
        raise ConfigError(f"{config.cert}: {exc}. Check this machine's clock") from None
    except CertificateRevokedError as exc:
        raise ConfigError(f"{config.cert}: {exc}; this node may not rejoin the cluster") \
            from None
    except SecurityError as exc:
        raise ConfigError(f"{config.cert} is not a node certificate of the cluster CA in "
                          f"{config.ca_cert}: {exc}") from None
    if info.node_id != identity.node_id:
        where = config.key or f"the data dir {config.data_dir}"
        raise ConfigError(
            f"certificate {config.cert} is for node {info.node_id} but the key of {where} is "
            f"node {identity.node_id}: issue a certificate for this node with `meshnode cert "
            f"issue --name {config.name}` (from this node's public key), or pass the key it "
            "was issued for with --key")
    security = ClusterSecurity(ca=ca, cert=cert, identity=identity, info=info,
                               cluster_id=cluster_id_of(ca), data_dir=Path(config.data_dir),
                               revocation=revocation)
    log.info("security.loaded", cluster=security.cluster_id, node=identity.node_id,
             expires=info.not_after.isoformat(),
             revocation=revocation.sequence if revocation else 0)
    return security


@dataclass(eq=False)
class ClusterSecurity:
    """The loaded identity of a signed node (see the module docstring)."""

    ca: x509.Certificate
    cert: x509.Certificate
    identity: NodeIdentity
    info: NodeCertInfo
    cluster_id: str
    data_dir: Path
    revocation: RevocationList | None = None
    on_revoked: list[Callable[[frozenset[str]], None]] = field(default_factory=list)
    """Called with the node ids newly revoked whenever a list is adopted."""
    serials: dict[str, int] = field(default_factory=dict)
    """Certificate serial of each peer seen (to apply a revocation by serial to a member)."""
    _peers: dict[tuple[bytes, int], NodeCertInfo] = field(default_factory=dict, repr=False)
    _server: ssl.SSLContext | None = field(default=None, repr=False)
    _client: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def revocation_seq(self) -> int:
        return self.revocation.sequence if self.revocation is not None else 0

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3, client certificate from the CA required (gossip TCP, internal listener)."""
        if self._server is None:
            self._server = server_context(self.cert, self.identity.private_key, self.ca)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            self._client = client_context(self.cert, self.identity.private_key, self.ca)
        return self._client

    def check_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                   expected_node_id: str | None = None) -> NodeCertInfo:
        """The peer's verified certificate; a SecurityError if it may not talk to us. Cached
        per (certificate, revocation sequence) until the certificate expires."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or ssl_object is None or ssl_object.version() != "TLSv1.3":
            return check_peer(ssl_object, self.ca, self.revocation)  # raises, saying why
        key = (der, self.revocation_seq)
        info = self._peers.get(key)
        if info is None or aware_now() > info.not_after:
            info = check_peer(ssl_object, self.ca, self.revocation)
            if len(self._peers) >= _PEER_CACHE_MAX:
                self._peers.clear()
            self._peers[key] = info
        if expected_node_id is not None and info.node_id != expected_node_id:
            raise CertificateError(f"peer is node {info.node_id}, expected {expected_node_id}")
        self.serials[info.node_id] = info.serial
        return info

    def mesh_peer_check(self, ssl_object: ssl.SSLObject | None, addr: Addr) -> str:
        """The Mesh's PeerCheck: the peer's node id, or raise."""
        return self.check_peer(ssl_object).node_id

    def is_revoked(self, node_id: str) -> bool:
        rl = self.revocation
        if rl is None:
            return False
        return node_id in rl.node_ids or self.serials.get(node_id, -1) in rl.serials

    def adopt_revocation(self, data: bytes) -> bool:
        """Merge a revocation list (bytes as `RevocationList.to_bytes`): verified against the
        CA, adopted and persisted if its sequence is higher. True if adopted. Raises
        RevocationError for a malformed or foreign list (nothing changes)."""
        merged = merge_revocations(self.revocation, data, certificate_public_key(self.ca))
        if merged is self.revocation:
            return False
        if merged.is_revoked(serial=self.info.serial, node_id=self.node_id):
            log.error("security.self_revoked", node=self.node_id, sequence=merged.sequence)
        previous = self.revocation
        save_revocation(self.data_dir, merged)
        self.revocation = merged
        self._peers.clear()
        revoked = frozenset(n for n in {*merged.node_ids, *self.serials}
                            if self.is_revoked(n) and not (
                                previous is not None and n in previous.node_ids))
        log.info("security.revocation_adopted", sequence=merged.sequence,
                 revoked=sorted(revoked))
        for callback in self.on_revoked:
            callback(revoked)
        return True

    def merge_revocation(self, data: bytes) -> list[str]:
        """TableSync's merge of a peer's revocation list: the sequence now held if `data`
        was adopted, else []."""
        return [str(self.revocation_seq)] if data and self.adopt_revocation(data) else []
