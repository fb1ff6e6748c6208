"""Invite tokens and the join exchange: a new node proves a one-time secret and gets a certificate.

Token: `mni1_` + base64url (no padding) of msgpack `[address, ca_fingerprint, secret, expires_at]`
- address: where the CA holder's join endpoint listens ("host:port"), printable, <= 255 chars;
- ca_fingerprint: SHA-256 of the CA certificate's DER (32 bytes): the TLS pin;
- secret: 32 random bytes; the CA holder stores only SHA-256(secret), with expiry and roles;
- expires_at: unix seconds, so the joiner can refuse a stale token before connecting.
About 130 characters for a short address.

Join flow (served over HTTPS by the CA holder's node, meshnode/http/invite_api.py: GET /join/ca,
POST /join; the joiner's side is meshnode/cli/join.py, run by `meshnode start --token`):
1. GET the CA certificate over `tls.bootstrap_client_context()` (unverified: the CA certificate
   is public), then `pinned_client_context(invite.ca_fingerprint, ca_pem)` checks it against the
   pin and makes it the only trust root (CERT_REQUIRED, TLS 1.3).
2. Over that pinned connection, POST `make_join_request(invite, public_key, name)`; the server
   answers `handle_join_request(ca, store, body)`; the joiner checks the answer with
   `accept_join_response(invite, body, public_key)`. The secret is sent only after step 1.

Bodies are msgpack (`application/msgpack`). `InviteStore` is one JSON file (mode 0600) rewritten
atomically under an exclusive lock (flock) by every operation, so the CLI adding invites and the
node redeeming them may be separate processes; a token is marked used on disk before its
certificate is issued. Used and unknown tokens are refused distinctly until the entry expires;
expired entries are pruned on the next write.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import secrets
import ssl
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meshnode.mesh.certs import ClusterCA, issue_node_cert
from meshnode.mesh.certverify import (
    NodeCertInfo,
    certificate_fingerprint,
    certificate_pem,
    check_roles,
    load_certificate,
    verify_node_cert,
)
from meshnode.mesh.crypto_errors import (
    CertificateError,
    FileCorruptError,
    FingerprintMismatchError,
    InviteExpiredError,
    InviteFormatError,
    InviteUnknownError,
    InviteUsedError,
)
from meshnode.mesh.identity import key_id
from meshnode.mesh.securefile import ensure_private_dir, read_private, replace_file
from meshnode.mesh.tls import client_context

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process use only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Invite",
    "InviteStore",
    "JoinRequest",
    "JoinResponse",
    "accept_join_response",
    "create_invite",
    "handle_join_request",
    "make_join_request",
    "parse_invite",
    "pinned_ca_certificate",
    "pinned_client_context",
]

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "mni1_"
_MAX_TOKEN = 1024
_MAX_BODY = 16 * 1024


class Invite(msgspec.Struct, frozen=True, array_like=True):
    address: str
    ca_fingerprint: bytes
    secret: bytes
    expires_at: int  # unix seconds

    def __repr__(self) -> str:  # never print the secret
        return f"Invite(address={self.address!r}, expires_at={self.expires_at})"


class JoinRequest(msgspec.Struct, frozen=True, tag="join"):
    secret: bytes
    public_key: bytes  # raw Ed25519, 32 bytes
    name: str


class JoinResponse(msgspec.Struct, frozen=True, tag="joined"):
    cert_pem: bytes
    ca_cert_pem: bytes


class _Entry(msgspec.Struct, frozen=True):
    expires_at: float
    roles: tuple[str, ...] = ()
    used_at: float | None = None


class _StoreFile(msgspec.Struct):
    version: int = 1
    invites: dict[str, _Entry] = msgspec.field(default_factory=dict)


_enc = msgspec.msgpack.Encoder().encode
_dec_invite = msgspec.msgpack.Decoder(Invite).decode
_dec_request = msgspec.msgpack.Decoder(JoinRequest).decode
_dec_response = msgspec.msgpack.Decoder(JoinResponse).decode
_dec_store = msgspec.json.Decoder(_StoreFile).decode


def _secret_hash(secret: bytes) -> str:
    return hashlib.sha256(b"meshnode-invite-v1\0" + secret).hexdigest()


class InviteStore:
    """The CA holder's invites: SHA-256 of each secret, its expiry, roles and use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        ensure_private_dir(self.path.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_StoreFile]:
        lock_fd = os.open(
            self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            if fcntl is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                state = _dec_store(read_private(self.path))
            except FileNotFoundError:
                state = _StoreFile()
            except (msgspec.DecodeError, ValueError) as e:
                raise FileCorruptError(f"{self.path}: {e}") from None
            yield state
        finally:
            os.close(lock_fd)  # releases the flock

    def _write(self, state: _StoreFile, now: float) -> None:
        state.invites = {h: e for h, e in state.invites.items() if e.expires_at > now}
        replace_file(self.path, msgspec.json.encode(state), 0o600)

    def add(
        self, secret: bytes, expires_at: float, roles: Iterable[str] = (), *, now: float
    ) -> None:
        with self._locked() as state:
            state.invites[_secret_hash(secret)] = _Entry(expires_at=expires_at, roles=tuple(roles))
            self._write(state, now)

    def redeem(self, secret: bytes, *, now: float) -> tuple[str, ...]:
        """Mark the invite used and return its roles; raises InviteUnknownError, InviteUsedError,
        InviteExpiredError. Refused attempts change nothing on disk."""
        with self._locked() as state:
            h = _secret_hash(secret)
            entry = state.invites.get(h)
            if entry is None:
                raise InviteUnknownError("unknown invite token (never issued, or expired long ago)")
            if entry.used_at is not None:
                raise InviteUsedError("invite token already used")
            if now >= entry.expires_at:
                raise InviteExpiredError("invite token expired")
            state.invites[h] = msgspec.structs.replace(entry, used_at=now)
            self._write(state, now)
            return entry.roles

    def pending(self, *, now: float) -> int:
        """Invites neither used nor expired."""
        with self._locked() as state:
            return sum(
                1 for e in state.invites.values() if e.used_at is None and e.expires_at > now
            )


def create_invite(
    ca: ClusterCA,
    address: str,
    ttl_s: float,
    *,
    store: InviteStore,
    roles: Iterable[str] = (),
    now: float | None = None,
) -> str:
    """Record a one-time invite in `store` and return its printable token."""
    if not 1 <= len(address) <= 255 or not address.isprintable() or " " in address:
        raise ValueError(f"bad address {address!r}")
    if not 0 < ttl_s <= 30 * 86400:
        raise ValueError("ttl_s must be in (0, 30 days]")
    roles = check_roles(roles)
    now = time.time() if now is None else now
    secret = secrets.token_bytes(32)
    expires_at = int(now + ttl_s)
    store.add(secret, expires_at, roles, now=now)
    invite = Invite(
        address=address, ca_fingerprint=ca.fingerprint, secret=secret, expires_at=expires_at
    )
    log.info("invite.created", cluster=ca.cluster_id, address=address, expires_at=expires_at)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(_enc(invite)).decode("ascii").rstrip("=")


def parse_invite(token: str, *, now: float | None = None) -> Invite:
    """Decode a token; raises InviteFormatError, or InviteExpiredError if `now` is past expiry
    (pass `now` to refuse before connecting)."""
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_TOKEN:
        raise InviteFormatError(f"not a meshnode invite token (expected {TOKEN_PREFIX}...)")
    body = token[len(TOKEN_PREFIX) :]
    try:
        invite = _dec_invite(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, msgspec.DecodeError):
        raise InviteFormatError("invite token is damaged (copy it again)") from None
    if len(invite.ca_fingerprint) != 32 or len(invite.secret) != 32 or not invite.address:
        raise InviteFormatError("invite token is damaged (copy it again)")
    if now is not None and now >= invite.expires_at:
        raise InviteExpiredError("invite token expired")
    return invite


def pinned_ca_certificate(
    ca_cert: bytes | x509.Certificate, fingerprint: bytes
) -> x509.Certificate:
    """`ca_cert` if its SHA-256 DER fingerprint is `fingerprint`; else FingerprintMismatchError."""
    try:
        cert = ca_cert if isinstance(ca_cert, x509.Certificate) else load_certificate(ca_cert)
    except CertificateError as e:
        raise FingerprintMismatchError(f"CA certificate unreadable: {e}") from None
    if not hmac.compare_digest(certificate_fingerprint(cert), fingerprint):
        raise FingerprintMismatchError("CA certificate does not match the invite token's pin")
    return cert


def pinned_client_context(
    ca_fingerprint: bytes, ca_cert: bytes | x509.Certificate
) -> ssl.SSLContext:
    """Client context for the join POST: the server chain must verify to the CA whose
    certificate matches `ca_fingerprint` (its only trust root; TLS 1.3; no client certificate)."""
    return client_context(None, None, pinned_ca_certificate(ca_cert, ca_fingerprint))


def make_join_request(invite: Invite, public_key: bytes, name: str) -> bytes:
    """The joining node's request body: token secret, its raw Ed25519 public key, its name."""
    return _enc(JoinRequest(secret=invite.secret, public_key=public_key, name=name))


def handle_join_request(
    ca: ClusterCA, store: InviteStore, body: bytes, *, days: int = 90, now: float | None = None
) -> bytes:
    """CA holder side: check the request, redeem the invite once, issue the certificate.

    Raises InviteFormatError (malformed body, key or name: the token is NOT consumed),
    InviteUnknownError, InviteUsedError, InviteExpiredError.
    """
    if len(body) > _MAX_BODY:
        raise InviteFormatError("join request too large")
    try:
        req = _dec_request(body)
        public_key = Ed25519PublicKey.from_public_bytes(req.public_key)
    except (msgspec.DecodeError, ValueError):
        raise InviteFormatError("malformed join request") from None
    if not 1 <= len(req.name) <= 64 or not req.name.isprintable():
        raise InviteFormatError("node name must be 1..64 printable characters")
    now = time.time() if now is None else now
    roles = store.redeem(req.secret, now=now)
    issued_at = dt.datetime.fromtimestamp(now, dt.UTC)
    cert = issue_node_cert(ca, public_key, req.name, roles, days=days, now=issued_at)
    log.info("invite.redeemed", cluster=ca.cluster_id, node=key_id(req.public_key), name=req.name)
    return _enc(JoinResponse(cert_pem=certificate_pem(cert), ca_cert_pem=certificate_pem(ca.cert)))


def accept_join_response(
    invite: Invite, body: bytes, public_key: bytes
) -> tuple[x509.Certificate, x509.Certificate, NodeCertInfo]:
    """Joining node side: (node cert, CA cert, info) once the CA matches the pin and the
    certificate verifies under it and carries our key. Raises InviteFormatError,
    FingerprintMismatchError, or a CertificateError."""
    try:
        resp = _dec_response(body)
    except (msgspec.DecodeError, ValueError):  # msgspec raises UnicodeDecodeError too
        raise InviteFormatError("malformed join response") from None
    ca_cert = pinned_ca_certificate(resp.ca_cert_pem, invite.ca_fingerprint)
    info = verify_node_cert(resp.cert_pem, ca_cert)
    if info.node_id != key_id(public_key):
        raise FingerprintMismatchError("issued certificate is not for this node's key")
    return load_certificate(resp.cert_pem), ca_cert, info
