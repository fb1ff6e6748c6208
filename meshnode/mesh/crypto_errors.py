"""Errors of the mesh's cryptographic layer (identity, certificates, TLS, gossip packets).

Every error here derives from `SecurityError`; third-party exceptions (`ValueError`,
`InvalidSignature`, `ssl.SSLError`, ...) are translated at the edge of each module and never
escape it. The lead parents `SecurityError` under the mesh package's own error root.

    SecurityError
    ├── SecureFileError                 a key/state file is missing its guarantees
    │   ├── FilePermissionError         readable or writable by group/others, or not a regular file
    │   └── FileCorruptError            unparsable, wrong key type, truncated
    ├── CAError
    │   ├── CAExistsError               init_ca into a directory that already holds a CA
    │   ├── CANotFoundError             load_ca from a directory without one
    │   └── CAPassphraseError           missing or wrong passphrase, or unencrypted key not allowed
    ├── CertificateError                a node (or CA) certificate was refused
    │   ├── CertificateParseError       bytes are not a certificate
    │   ├── UntrustedCertificateError   not signed by the cluster CA (rogue CA, self-signed)
    │   ├── CertificateExpiredError     now > not_after (of the node or of the CA certificate)
    │   ├── CertificateNotYetValidError now < not_before
    │   ├── ClusterMismatchError        SAN cluster id differs from the CA's cluster id
    │   ├── CertificateRevokedError     serial or node id in the revocation list
    │   ├── InvalidNodeCertificateError SAN/roles/constraints malformed, node id not the key's hash
    │   ├── NodeIdMismatchError         valid certificate, but not the node that was expected
    │   └── PeerCertificateMissingError TLS peer sent no certificate, or not over TLS 1.3
    ├── RevocationError
    │   ├── RevocationFormatError       bytes are not a revocation list
    │   └── RevocationSignatureError    not signed by this cluster's CA
    ├── InviteError
    │   ├── InviteFormatError           token or join request malformed
    │   ├── InviteUnknownError          no such invite (never issued, or pruned after expiry)
    │   ├── InviteUsedError             already redeemed (one-time)
    │   ├── InviteExpiredError          past its expiry
    │   └── FingerprintMismatchError    CA certificate does not match the token's pin
    └── PacketAuthError                 misuse of PacketSealer (unknown peer, bad key material);
                                        forged/replayed datagrams are counted, never raised
"""

from __future__ import annotations

__all__ = [
    "CAError",
    "CAExistsError",
    "CANotFoundError",
    "CAPassphraseError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "CertificateParseError",
    "CertificateRevokedError",
    "ClusterMismatchError",
    "FileCorruptError",
    "FilePermissionError",
    "FingerprintMismatchError",
    "InvalidNodeCertificateError",
    "InviteError",
    "InviteExpiredError",
    "InviteFormatError",
    "InviteUnknownError",
    "InviteUsedError",
    "NodeIdMismatchError",
    "PacketAuthError",
    "PeerCertificateMissingError",
    "RevocationError",
    "RevocationFormatError",
    "RevocationSignatureError",
    "SecureFileError",
    "SecurityError",
    "UntrustedCertificateError",
]


class SecurityError(Exception):
    """Root of every error raised by the cryptographic layer."""


class SecureFileError(SecurityError):
    pass


class FilePermissionError(SecureFileError):
    pass


class FileCorruptError(SecureFileError):
    pass


class CAError(SecurityError):
    pass


class CAExistsError(CAError):
    pass


class CANotFoundError(CAError):
    pass


class CAPassphraseError(CAError):
    pass


class CertificateError(SecurityError):
    pass


class CertificateParseError(CertificateError):
    pass


class UntrustedCertificateError(CertificateError):
    pass


class CertificateExpiredError(CertificateError):
    pass


class CertificateNotYetValidError(CertificateError):
    pass


class ClusterMismatchError(CertificateError):
    pass


class CertificateRevokedError(CertificateError):
    pass


class InvalidNodeCertificateError(CertificateError):
    pass


class NodeIdMismatchError(CertificateError):
    pass


class PeerCertificateMissingError(CertificateError):
    pass


class RevocationError(SecurityError):
    pass


class RevocationFormatError(RevocationError):
    pass


class RevocationSignatureError(RevocationError):
    pass


class InviteError(SecurityError):
    pass


class InviteFormatError(InviteError):
    pass


class InviteUnknownError(InviteError):
    pass


class InviteUsedError(InviteError):
    pass


class InviteExpiredError(InviteError):
    pass


class FingerprintMismatchError(InviteError):
    pass


class PacketAuthError(SecurityError):
    pass
