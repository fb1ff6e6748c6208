"""Cluster CA and node certificate issuance (Ed25519, X.509). Verification: certverify.py.

The cluster CA is a self-signed Ed25519 certificate (basic constraints CA=true, path length 0, key
usage keyCertSign + cRLSign). `cluster_id = key_id(raw CA public key)` (see identity.py). Its key
is PKCS#8 PEM, unencrypted only on request, else encrypted under a key stretched with scrypt:

    ca_key.pem = PKCS#8 PEM + "Meshnode-KDF: scrypt n=131072 r=8 p=1 salt=<32 hex>\n"
    PKCS#8 password = hex(scrypt(passphrase, salt, n, r, p, length=32))

Why: cryptography's BestAvailableEncryption alone is PBKDF2-HMAC-SHA256 with 2048 iterations
(~1 ms per guess); scrypt at n=2**17, r=8 (OWASP's minimum) costs ~0.5 s and 128 MiB per guess.
The parameters travel in the file (a trailer line after the PEM block, which PEM readers skip),
so they can be raised later; a key without the trailer still loads with the passphrase itself.

A node certificate (profile in certverify.py) carries the node id and cluster in a SAN URI, the
roles as SAN URIs, the node name as CN, validity not_before = now - 5 min (clock skew between
nodes) to not_after = min(now + `days`, CA expiry), a random 159-bit serial, key usage
digitalSignature, EKU serverAuth + clientAuth (every node is both ends of mTLS), and subject and
authority key identifiers (OpenSSL's strict chain checks want them).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshnode.mesh.certverify import (
    NODE_URI_SCHEME,
    ROLE_URI_PREFIX,
    aware_now,
    certificate_fingerprint,
    certificate_pem,
    certificate_public_key,
    check_revocation,
    check_roles,
    cluster_id_of,
    inspect_node_cert,
    load_certificate,
)
from meshnode.mesh.crypto_errors import (
    CAExistsError,
    CANotFoundError,
    CAPassphraseError,
    CertificateParseError,
    FileCorruptError,
)
from meshnode.mesh.identity import NodeIdentity, key_id, raw_public_key
from meshnode.mesh.revocation import RevocationList
from meshnode.mesh.securefile import create_private, ensure_private_dir, read_private, read_public

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CLOCK_SKEW",
    "ClusterCA",
    "NodeBundle",
    "init_ca",
    "issue_node_bundle",
    "issue_node_cert",
    "load_ca",
    "renew_node_cert",
]

log = structlog.get_logger(__name__)

CA_CERT_FILE = "ca_cert.pem"
CA_KEY_FILE = "ca_key.pem"
CLOCK_SKEW = dt.timedelta(minutes=5)
_KDF_HEADER = b"Meshnode-KDF: scrypt "
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**17, 8, 1  # 128 * n * r bytes = 128 MiB per guess
_KDF_RE = re.compile(rb"n=(\d{1,8}) r=(\d{1,3}) p=(\d{1,3}) salt=([0-9a-f]{32})")


def _stretch(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The PKCS#8 password: hex of scrypt(passphrase) (hex: PKCS#8 passwords are text)."""
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase).hex().encode()


def _encrypt_key(key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    if passphrase is None:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    salt = os.urandom(16)
    password = _stretch(passphrase, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(password))
    header = b"n=%d r=%d p=%d salt=%s" % (_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, salt.hex().encode())
    return pem + _KDF_HEADER + header + b"\n"


def _key_password(
    key_pem: bytes, passphrase: bytes | None, path: Path
) -> tuple[bytes, bytes | None]:
    """(the PEM to parse, its PKCS#8 password) for a stored CA key."""
    pem, found, trailer = key_pem.partition(_KDF_HEADER)
    if not found:
        return key_pem, passphrase
    m = _KDF_RE.fullmatch(trailer.strip())
    if m is None:
        raise FileCorruptError(f"{path}: unreadable Meshnode-KDF header")
    n, r, p = (int(g) for g in m.group(1, 2, 3))
    if not (2 <= n <= 2**22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise FileCorruptError(f"{path}: scrypt parameters out of range")
    if passphrase is None:
        raise CAPassphraseError(f"{path}: the CA key is encrypted; a passphrase is needed")
    return pem, _stretch(passphrase, bytes.fromhex(m.group(4).decode()), n, r, p)


@dataclass(frozen=True, slots=True)
class ClusterCA:
    """The cluster CA: its certificate and signing key (held by the CA holder only)."""

    cert: x509.Certificate
    private_key: Ed25519PrivateKey = field(repr=False)
    cluster_id: str

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the CA certificate's DER: the pin carried by invite tokens."""
        return certificate_fingerprint(self.cert)


@dataclass(frozen=True, slots=True)
class NodeBundle:
    """A node certificate issued together with a fresh key (for nodes provisioned by the CA)."""

    cert: x509.Certificate
    private_key: Ed25519PrivateKey = field(repr=False)
    node_id: str


def _name(common_name: str) -> x509.Name:
    if not 1 <= len(common_name) <= 64 or not common_name.isprintable():
        raise ValueError("name must be 1..64 printable characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def init_ca(
    directory: str | os.PathLike[str],
    name: str,
    passphrase: bytes | None,
    *,
    allow_unencrypted: bool = False,
    days: int = 3650,
    now: dt.datetime | None = None,
) -> ClusterCA:
    """Create a cluster CA in `directory` (ca_key.pem mode 0600, ca_cert.pem mode 0644).

    The key is encrypted under scrypt(`passphrase`) (module docstring); `passphrase=None`
    is accepted only with `allow_unencrypted=True`. Raises CAExistsError if a CA is there.
    """
    if passphrase is None and not allow_unencrypted:
        raise CAPassphraseError("a CA key needs a passphrase (or allow_unencrypted=True)")
    if passphrase is not None and not passphrase:
        raise CAPassphraseError("empty passphrase")
    now = aware_now(now)
    path = ensure_private_dir(directory)
    if (path / CA_KEY_FILE).exists() or (path / CA_CERT_FILE).exists():
        raise CAExistsError(f"{path} already holds a cluster CA")
    key = Ed25519PrivateKey.generate()
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    pem_key = _encrypt_key(key, passphrase)
    if not create_private(path / CA_KEY_FILE, pem_key, 0o600):
        raise CAExistsError(f"{path} already holds a cluster CA")
    create_private(path / CA_CERT_FILE, certificate_pem(cert), 0o644)
    ca = ClusterCA(cert=cert, private_key=key, cluster_id=cluster_id_of(cert))
    log.info("ca.created", cluster=ca.cluster_id, name=name, encrypted=passphrase is not None)
    return ca


def load_ca(directory: str | os.PathLike[str], passphrase: bytes | None) -> ClusterCA:
    """Load the CA made by `init_ca`. Raises CANotFoundError, CAPassphraseError, or
    FilePermissionError / FileCorruptError for an unsafe or damaged file."""
    path = ensure_private_dir(directory)
    try:
        cert_pem = read_public(path / CA_CERT_FILE)
        key_pem = read_private(path / CA_KEY_FILE, limit=64 * 1024)
    except FileNotFoundError as e:
        raise CANotFoundError(f"no cluster CA in {path} ({e.filename})") from None
    try:
        cert = load_certificate(cert_pem)
    except CertificateParseError as e:
        raise FileCorruptError(f"{path / CA_CERT_FILE}: {e}") from None
    key_pem, password = _key_password(key_pem, passphrase, path / CA_KEY_FILE)
    try:
        key = serialization.load_pem_private_key(key_pem, password=password)
    except TypeError as e:  # encrypted without passphrase, or passphrase for a plain key
        raise CAPassphraseError(f"{path / CA_KEY_FILE}: {e}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CAPassphraseError(f"{path / CA_KEY_FILE}: wrong passphrase or corrupt key") from None
    if not isinstance(key, Ed25519PrivateKey) or raw_public_key(key) != raw_public_key(
        certificate_public_key(cert)
    ):
        raise FileCorruptError(f"{path}: CA key does not match the CA certificate")
    return ClusterCA(cert=cert, private_key=key, cluster_id=cluster_id_of(cert))


def issue_node_cert(
    ca: ClusterCA,
    public_key: Ed25519PublicKey | bytes,
    name: str,
    roles: Iterable[str] = (),
    *,
    days: int = 90,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Sign a node certificate for `public_key` (an Ed25519 key or its 32 raw bytes).

    Raises ValueError for a bad key, name or role (checked before anything is signed).
    """
    if isinstance(public_key, bytes | bytearray):
        public_key = Ed25519PublicKey.from_public_bytes(bytes(public_key))
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("node key must be Ed25519")
    if not 1 <= days <= 3650:
        raise ValueError("days must be in 1..3650")
    now = aware_now(now)
    node_id = key_id(raw_public_key(public_key))
    uris = [f"{NODE_URI_SCHEME}{ca.cluster_id}/{node_id}"]
    uris += [f"{ROLE_URI_PREFIX}{r}" for r in check_roles(roles)]
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key), critical=False
        )
        .sign(ca.private_key, None)
    )
    log.info("ca.issued", node=node_id, name=name, serial=f"{cert.serial_number:x}", days=days)
    return cert


def issue_node_bundle(
    ca: ClusterCA,
    name: str,
    roles: Iterable[str] = (),
    *,
    days: int = 90,
    now: dt.datetime | None = None,
) -> NodeBundle:
    """Make a fresh node key and its certificate."""
    identity = NodeIdentity.generate()
    cert = issue_node_cert(ca, identity.public_key, name, roles, days=days, now=now)
    return NodeBundle(cert=cert, private_key=identity.private_key, node_id=identity.node_id)


def renew_node_cert(
    ca: ClusterCA,
    cert: x509.Certificate | bytes,
    *,
    days: int = 90,
    now: dt.datetime | None = None,
    revocation: RevocationList | None = None,
) -> x509.Certificate:
    """Re-issue `cert` (same key, name and roles; new serial and expiry).

    The old certificate must have been issued by this CA; it may have expired. A revoked one is
    refused (CertificateRevokedError).
    """
    if not isinstance(cert, x509.Certificate):
        cert = load_certificate(cert)
    info = inspect_node_cert(cert, ca.cert)
    if revocation is not None:
        check_revocation(info, revocation, ca.public_key)
    key = certificate_public_key(cert)
    return issue_node_cert(ca, key, info.name, info.roles, days=days, now=now)
