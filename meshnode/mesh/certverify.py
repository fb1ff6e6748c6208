"""Reading and verifying node certificates (what certs.py issues).

Node certificate profile (the checks below enforce it):
- SAN URI `meshnode://<cluster_id>/<node_id>`, exactly one, where node_id = key_id(the
  certificate's own Ed25519 key), so a certificate cannot name another node;
- one SAN URI `meshnode-role:<role>` per role, role = [a-z][a-z0-9_-]{0,31} (at most 16). SAN URIs
  rather than a private-OID extension: standard tools print them (`openssl x509 -text`), and they
  need no ASN.1 codec of our own;
- subject CN = node name; basic constraints CA=false.

`verify_node_cert` checks, in this order, with a distinct error for each: parse, signature by the
CA (issuer name + Ed25519 signature), CA validity window, node validity window, constraints and SAN
shape, node id = hash of key, SAN cluster id = CA's cluster id, revocation. The signature comes
first so no field of an unsigned certificate is believed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from meshnode.mesh.crypto_errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertificateParseError,
    CertificateRevokedError,
    ClusterMismatchError,
    InvalidNodeCertificateError,
    UntrustedCertificateError,
)
from meshnode.mesh.identity import is_key_id, key_id, raw_public_key
from meshnode.mesh.revocation import RevocationList

__all__ = [
    "NODE_URI_SCHEME",
    "ROLE_URI_PREFIX",
    "NodeCertInfo",
    "aware_now",
    "certificate_fingerprint",
    "certificate_pem",
    "certificate_public_key",
    "check_revocation",
    "check_roles",
    "cluster_id_of",
    "inspect_node_cert",
    "load_certificate",
    "verify_node_cert",
]

NODE_URI_SCHEME = "meshnode://"
ROLE_URI_PREFIX = "meshnode-role:"
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_MAX_ROLES = 16
_MAX_CERT_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class NodeCertInfo:
    """What a verified node certificate says."""

    node_id: str
    cluster_id: str
    name: str
    roles: tuple[str, ...]
    not_after: dt.datetime  # aware, UTC
    serial: int


def aware_now(now: dt.datetime | None = None) -> dt.datetime:
    """`now`, or the current UTC time; ValueError for a naive datetime."""
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def certificate_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding (32 bytes)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse one certificate, PEM or DER. Raises CertificateParseError on anything else.

    Deprecated encodings that cryptography only warns about (negative serials, ...) are refused:
    this CA never issues them.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > _MAX_CERT_BYTES:
        raise CertificateParseError("not a certificate (wrong type or too large)")
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion, Warning) as e:
        raise CertificateParseError(f"not a certificate: {e}") from None


def certificate_public_key(cert: x509.Certificate) -> Ed25519PublicKey:
    """The certificate's Ed25519 key; InvalidNodeCertificateError for any other kind."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidNodeCertificateError(f"unreadable public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidNodeCertificateError(f"public key is {type(key).__name__}, not Ed25519")
    return key


def cluster_id_of(ca_cert: x509.Certificate) -> str:
    """The cluster id: key_id of the CA's raw Ed25519 public key."""
    return key_id(raw_public_key(certificate_public_key(ca_cert)))


def check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Roles sorted and deduplicated; ValueError unless each is [a-z][a-z0-9_-]{0,31} (max 16)."""
    out = tuple(sorted(set(roles)))
    if len(out) > _MAX_ROLES or not all(_ROLE_RE.fullmatch(r) for r in out):
        raise ValueError(f"roles must be at most {_MAX_ROLES} of [a-z][a-z0-9_-]{{0,31}}: {out}")
    return out


def verify_node_cert(
    cert: x509.Certificate | bytes,
    ca_cert: x509.Certificate,
    now: dt.datetime | None = None,
    revocation: RevocationList | None = None,
) -> NodeCertInfo:
    """Verify a node certificate (PEM/DER bytes or parsed) against the cluster CA.

    Raises CertificateParseError, UntrustedCertificateError, CertificateExpiredError,
    CertificateNotYetValidError, InvalidNodeCertificateError, ClusterMismatchError,
    CertificateRevokedError (and RevocationSignatureError if `revocation` is not this CA's).
    """
    now = aware_now(now)
    info = inspect_node_cert(cert, ca_cert, now)
    if revocation is not None:
        check_revocation(info, revocation, certificate_public_key(ca_cert))
    return info


def _as_certificate(cert: x509.Certificate | bytes) -> x509.Certificate:
    return cert if isinstance(cert, x509.Certificate) else load_certificate(cert)


def check_revocation(
    info: NodeCertInfo, revocation: RevocationList, ca_key: Ed25519PublicKey
) -> None:
    """CertificateRevokedError if the list (verified against `ca_key` first, cached) names the
    certificate's serial or node id; RevocationSignatureError if it is not the CA's list."""
    revocation.verify(ca_key)
    if revocation.is_revoked(serial=info.serial, node_id=info.node_id):
        raise CertificateRevokedError(
            f"node {info.node_id} (serial {info.serial:x}) is revoked "
            f"(revocation list sequence {revocation.sequence})"
        )


def inspect_node_cert(
    cert: x509.Certificate | bytes, ca_cert: x509.Certificate, now: dt.datetime | None = None
) -> NodeCertInfo:
    """Every check of verify_node_cert but revocation; the validity windows only when `now` is
    given (renewal accepts an expired certificate)."""
    cert = _as_certificate(cert)
    cluster_id = cluster_id_of(ca_cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise UntrustedCertificateError(
            f"certificate not signed by cluster CA {cluster_id} ({type(e).__name__}: {e})"
        ) from None
    try:
        return _read_fields(cert, ca_cert, cluster_id, now)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # lazily parsed extensions
        raise InvalidNodeCertificateError(f"malformed certificate: {e}") from None


def _read_fields(
    cert: x509.Certificate, ca_cert: x509.Certificate, cluster_id: str, now: dt.datetime | None
) -> NodeCertInfo:
    if now is not None:
        if now > ca_cert.not_valid_after_utc:
            raise CertificateExpiredError(
                f"cluster CA certificate expired {ca_cert.not_valid_after_utc}"
            )
        if now > cert.not_valid_after_utc:
            raise CertificateExpiredError(f"node certificate expired {cert.not_valid_after_utc}")
        if now < cert.not_valid_before_utc:
            raise CertificateNotYetValidError(
                f"node certificate valid from {cert.not_valid_before_utc}"
            )
    exts = cert.extensions
    try:
        is_ca = exts.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise InvalidNodeCertificateError("a CA certificate is not a node certificate")
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidNodeCertificateError("no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    nodes = [u[len(NODE_URI_SCHEME) :] for u in uris if u.startswith(NODE_URI_SCHEME)]
    roles = tuple(sorted(u[len(ROLE_URI_PREFIX) :] for u in uris if u.startswith(ROLE_URI_PREFIX)))
    if len(nodes) != 1:
        raise InvalidNodeCertificateError(f"expected one {NODE_URI_SCHEME} URI, found {len(nodes)}")
    san_cluster, _, san_node = nodes[0].partition("/")
    if not (is_key_id(san_cluster) and is_key_id(san_node)):
        raise InvalidNodeCertificateError(f"malformed node URI {NODE_URI_SCHEME}{nodes[0]}")
    if not all(_ROLE_RE.fullmatch(r) for r in roles):
        raise InvalidNodeCertificateError(f"malformed role in {roles}")
    node_id = key_id(raw_public_key(certificate_public_key(cert)))
    if san_node != node_id:
        raise InvalidNodeCertificateError(f"SAN node id {san_node} is not the key's id {node_id}")
    if san_cluster != cluster_id:
        raise ClusterMismatchError(f"certificate is for cluster {san_cluster}, not {cluster_id}")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = cns[0].value if len(cns) == 1 else ""
    if not isinstance(name, str) or not name:
        raise InvalidNodeCertificateError("subject needs exactly one common name")
    return NodeCertInfo(
        node_id=node_id,
        cluster_id=cluster_id,
        name=name,
        roles=roles,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
    )
