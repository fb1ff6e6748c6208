"""Mutual TLS between nodes: the cluster CA is the only trust root.

Contexts: TLS 1.3 only; no system CAs are loaded; chain verification to the cluster CA is
required (CERT_REQUIRED on both sides); hostname checking is off, because nodes are named by the
SAN URI `meshnode://<cluster_id>/<node_id>`, not by DNS names. After the handshake, `check_peer`
reads the peer's certificate and checks node id, cluster id, expiry and revocation; OpenSSL's
chain check alone does not know about meshnode's SAN or revocation list.

Python's ssl module loads keys only from files: `_load_chain` writes the certificate and the key,
the latter encrypted with a one-time random passphrase, into a private temporary directory that
is removed right after loading. Contexts are built once per certificate (start, renewal).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.mesh.certverify import NodeCertInfo, certificate_pem, verify_node_cert
from meshnode.mesh.crypto_errors import NodeIdMismatchError, PeerCertificateMissingError
from meshnode.mesh.revocation import RevocationList

__all__ = [
    "bootstrap_client_context",
    "check_peer",
    "client_context",
    "server_context",
    "trust_only",
]


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)  # no load_default_certs(): no system trust store
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def trust_only(ctx: ssl.SSLContext, ca: x509.Certificate) -> None:
    """Make `ca` the context's only trust anchor and require a verified chain to it."""
    ctx.load_verify_locations(cadata=certificate_pem(ca).decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_chain(ctx: ssl.SSLContext, cert: x509.Certificate, key: Ed25519PrivateKey) -> None:
    password = secrets.token_bytes(32)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="meshnode-tls-") as tmp:  # mode 0700
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        for path, data in ((cert_path, certificate_pem(cert)), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def server_context(
    cert: x509.Certificate,
    key: Ed25519PrivateKey,
    ca: x509.Certificate,
    *,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """Server side of node-to-node mTLS.

    `require_client_cert=False` (CERT_OPTIONAL: a certificate sent is still verified) exists for
    the join endpoint only, whose clients have no certificate yet; every other path served by
    such a listener must then call `check_peer` and refuse on PeerCertificateMissingError.
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    trust_only(ctx, ca)
    if not require_client_cert:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    _load_chain(ctx, cert, key)
    return ctx


def client_context(
    cert: x509.Certificate | None,
    key: Ed25519PrivateKey | None,
    ca: x509.Certificate,
) -> ssl.SSLContext:
    """Client side of node-to-node mTLS (cert/key None: a joining node without a certificate)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # must precede trust_only: names are SAN URIs, see check_peer
    trust_only(ctx, ca)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def bootstrap_client_context() -> ssl.SSLContext:
    """TLS 1.3 with NO server verification, only for fetching public data that is checked by
    other means: the CA certificate, checked against an invite token's pin
    (`invite.pinned_client_context`). Never send a secret over it."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    ca: x509.Certificate,
    revocation: RevocationList | None = None,
    expected_node_id: str | None = None,
    *,
    now: dt.datetime | None = None,
) -> NodeCertInfo:
    """After the handshake: who is the peer? (asyncio: `writer.get_extra_info("ssl_object")`).

    Re-verifies the peer certificate against the CA (signature, validity, SAN cluster/node id)
    and the revocation list. Raises PeerCertificateMissingError (no TLS, not TLS 1.3, no client
    certificate), NodeIdMismatchError, or any error of `verify_node_cert`.
    """
    if ssl_object is None:
        raise PeerCertificateMissingError("connection is not TLS")
    if ssl_object.version() != "TLSv1.3":
        raise PeerCertificateMissingError(f"connection uses {ssl_object.version()}, not TLSv1.3")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerCertificateMissingError("peer sent no certificate")
    info = verify_node_cert(der, ca, now, revocation)
    if expected_node_id is not None and info.node_id != expected_node_id:
        raise NodeIdMismatchError(f"peer is node {info.node_id}, expected {expected_node_id}")
    return info
