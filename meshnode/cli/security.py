"""`meshnode ca init|show`, `meshnode cert pubkey|issue|show|verify|renew|revoke`.

The CA lives in a directory (default `<data dir>/ca`): ca_cert.pem (public), ca_key.pem (0600,
encrypted under a scrypt-stretched passphrase unless --no-passphrase), revocation.bin (the
latest CA-signed revocation list) and invites.json. The passphrase comes from
--passphrase-file, else MESHNODE_CA_PASSPHRASE, else a prompt (twice on init); at least 12
characters, because the key file may be copied and guessed offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from .client import AdminClient, CliError
from .keys import install_api_key
from .table import table

__all__ = ["add_security_commands", "read_passphrase"]

MIN_PASSPHRASE = 12
PASSPHRASE_ENV = "MESHNODE_CA_PASSPHRASE"


def _default_ca_dir() -> str:
    from meshnode.node import default_data_dir
    return os.path.join(os.environ.get("MESHNODE_DATA_DIR") or default_data_dir(), "ca")


def read_passphrase(file: str | None, *, confirm: bool = False) -> bytes:
    """The CA passphrase from `file`, MESHNODE_CA_PASSPHRASE or a prompt; CliError if short."""
    if file:
        try:
            text = Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise CliError(f"cannot read the passphrase file: {exc}") from None
    elif os.environ.get(PASSPHRASE_ENV):
        text = os.environ[PASSPHRASE_ENV]
    elif sys.stdin.isatty():
        text = getpass.getpass("CA passphrase: ")
        if confirm and getpass.getpass("again: ") != text:
            raise CliError("the passphrases differ; run the command again")
    else:
        raise CliError(f"the CA key needs its passphrase: set {PASSPHRASE_ENV}, pass "
                       "--passphrase-file FILE, or run in a terminal")
    if len(text) < MIN_PASSPHRASE:
        raise CliError(f"the passphrase must have at least {MIN_PASSPHRASE} characters "
                       "(a few words work well)")
    return text.encode()


def _quiet() -> None:
    """The library's info logs (ca.issued, ...) are for a node's log, not this command's."""
    from .logs import configure_logging
    configure_logging("console", "warning")


def _load_ca(args: argparse.Namespace) -> Any:
    from meshnode.mesh.certs import load_ca
    from meshnode.mesh.crypto_errors import CAPassphraseError, SecurityError

    _quiet()
    ca_dir = args.ca_dir or _default_ca_dir()
    key = Path(ca_dir, "ca_key.pem")
    encrypted = key.is_file() and b"ENCRYPTED" in key.read_bytes()[:64]
    try:
        return load_ca(ca_dir, read_passphrase(args.passphrase_file) if encrypted else None)
    except CAPassphraseError:
        raise CliError(f"wrong passphrase for the CA in {ca_dir}") from None
    except SecurityError as exc:
        raise CliError(f"{exc}. `meshnode ca init --dir DIR` makes a CA; --ca-dir picks "
                       "another one") from None


def _ca_cert(args: argparse.Namespace) -> Any:
    from meshnode.mesh.certverify import load_certificate
    from meshnode.mesh.crypto_errors import CertificateError

    path = getattr(args, "ca_cert", None) or os.path.join(args.ca_dir or _default_ca_dir(),
                                                          "ca_cert.pem")
    try:
        return load_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CliError(f"no CA certificate at {path}: pass --ca-cert FILE or --ca-dir DIR")\
            from None
    except CertificateError as exc:
        raise CliError(f"{path}: {exc}") from None


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _fingerprint(cert: Any) -> str:
    from meshnode.mesh.certverify import certificate_fingerprint
    return certificate_fingerprint(cert).hex()


def _ca_init(args: argparse.Namespace) -> int:
    from meshnode.mesh.certs import init_ca
    from meshnode.mesh.crypto_errors import SecurityError

    _quiet()
    ca_dir = args.dir or _default_ca_dir()
    passphrase = None if args.no_passphrase else read_passphrase(args.passphrase_file,
                                                                 confirm=True)
    try:
        ca = init_ca(ca_dir, args.name, passphrase, allow_unencrypted=args.no_passphrase)
    except SecurityError as exc:
        raise CliError(f"{exc}: `meshnode ca show --dir {ca_dir}` shows it; pick another "
                       "--dir for a new cluster") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"cluster CA {args.name!r} created in {ca_dir}")
    print(f"cluster id   {ca.cluster_id}")
    print(f"fingerprint  {ca.fingerprint.hex()}")
    print("key          " + ("NOT encrypted (--no-passphrase): guard the file"
                             if passphrase is None else "encrypted (scrypt + AES-256)"))
    print("next: `meshnode cert issue --name NODE --bundle DIR` for each node, or "
          "`meshnode invite` on a node holding this CA")
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    from meshnode.mesh.certverify import cluster_id_of

    args.ca_cert = None
    ca_dir = args.dir or _default_ca_dir()
    args.ca_dir = ca_dir
    cert = _ca_cert(args)
    key = Path(ca_dir, "ca_key.pem")
    state = ("absent (this machine cannot sign)" if not key.is_file() else
             "encrypted" if b"ENCRYPTED" in key.read_bytes()[:64] else "NOT encrypted")
    rows = [["name", cert.subject.rfc4514_string()], ["cluster id", cluster_id_of(cert)],
            ["fingerprint", _fingerprint(cert)], ["valid from", _when(cert.not_valid_before_utc)],
            ["valid until", _when(cert.not_valid_after_utc)], ["key", state],
            ["directory", ca_dir]]
    print(table(["FIELD", "VALUE"], rows))
    return 0


def _read_public_key(path: str) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from meshnode.mesh.identity import raw_public_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the public key: {exc}") from None
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise CliError(f"{path} is not a PEM public key: on the new node, "
                       "`meshnode cert pubkey --data-dir DIR > node.pub` writes one") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CliError(f"{path} holds a {type(key).__name__}; meshnode nodes use Ed25519")
    return raw_public_key(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    from meshnode.mesh.securefile import ensure_private_dir, replace_file
    ensure_private_dir(path.parent)
    replace_file(path, data, mode)


def _cert_pubkey(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from meshnode.mesh.identity import NodeIdentity
    from meshnode.node import default_data_dir

    identity = NodeIdentity.load_or_create(args.data_dir or default_data_dir())
    sys.stdout.write(identity.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    print(f"node id {identity.node_id}", file=sys.stderr)
    return 0


def _cert_issue(args: argparse.Namespace) -> int:
    from meshnode.mesh.certs import issue_node_bundle, issue_node_cert
    from meshnode.mesh.certverify import certificate_pem, inspect_node_cert
    from meshnode.mesh.identity import KEY_FILE_NAME

    if bool(args.public_key) == bool(args.bundle):
        raise CliError("give exactly one of --public-key FILE (the node's key, from "
                       "`meshnode cert pubkey`) or --bundle DIR (a fresh key made here)")
    roles = [r.strip() for r in (args.roles or "").split(",") if r.strip()]
    raw = _read_public_key(args.public_key) if args.public_key else None
    ca = _load_ca(args)
    try:
        if raw is not None:
            cert = issue_node_cert(ca, raw, args.name, roles, days=args.days)
            out = Path(args.out or f"{args.name}-cert.pem")
            _write(out, certificate_pem(cert), 0o644)
            files = [str(out)]
        else:
            from cryptography.hazmat.primitives import serialization
            bundle = issue_node_bundle(ca, args.name, roles, days=args.days)
            cert, out = bundle.cert, Path(args.bundle)
            if (out / KEY_FILE_NAME).exists():
                raise CliError(f"{out} already holds a node key; choose an empty --bundle DIR")
            key_pem = bundle.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            _write(out / KEY_FILE_NAME, key_pem, 0o600)
            _write(out / "cert.pem", certificate_pem(cert), 0o644)
            _write(out / "ca_cert.pem", certificate_pem(ca.cert), 0o644)
            files = [str(out / n) for n in (KEY_FILE_NAME, "cert.pem", "ca_cert.pem")]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    info = inspect_node_cert(cert, ca.cert)
    print(f"issued {info.name}: node {info.node_id}, serial {info.serial:x}, "
          f"until {_when(info.not_after)}")
    for f in files:
        print(f"  {f}")
    if args.bundle:
        print(f"start it with: meshnode start --data-dir {out} --ca {out}/ca_cert.pem "
              f"--cert {out}/cert.pem")
    return 0


def _cert_rows(cert: Any) -> list[list[str]]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    node = next((u for u in uris if u.startswith("meshnode://")), "-")
    roles = [u.split(":", 1)[1] for u in uris if u.startswith("meshnode-role:")]
    return [["name", str(cns[0].value) if cns else "-"], ["node", node],
            ["roles", ", ".join(roles) or "-"], ["serial", f"{cert.serial_number:x}"],
            ["valid from", _when(cert.not_valid_before_utc)],
            ["valid until", _when(cert.not_valid_after_utc)],
            ["issuer", cert.issuer.rfc4514_string()], ["fingerprint", _fingerprint(cert)]]


def _load_node_cert(path: str) -> Any:
    from meshnode.mesh.certverify import load_certificate
    from meshnode.mesh.crypto_errors import CertificateError
    try:
        return load_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except CertificateError as exc:
        raise CliError(f"{path}: {exc}") from None


def _cert_show(args: argparse.Namespace) -> int:
    print(table(["FIELD", "VALUE"], _cert_rows(_load_node_cert(args.file))))
    return 0


def _revocation(ca_dir: str, ca_cert: Any) -> Any:
    from meshnode.mesh.certverify import certificate_public_key
    from meshnode.mesh.crypto_errors import RevocationError
    from meshnode.mesh.revocation import load_revocation
    try:
        return load_revocation(ca_dir, certificate_public_key(ca_cert))
    except RevocationError as exc:
        raise CliError(f"{ca_dir}/revocation.bin: {exc}; move it away to continue") from None


def _cert_verify(args: argparse.Namespace) -> int:
    from meshnode.mesh.certverify import verify_node_cert
    from meshnode.mesh.crypto_errors import SecurityError

    cert = _load_node_cert(args.file)
    ca_cert = _ca_cert(args)
    revocation = _revocation(args.ca_dir or _default_ca_dir(), ca_cert)
    try:
        info = verify_node_cert(cert, ca_cert, revocation=revocation)
    except SecurityError as exc:
        raise CliError(f"{args.file} is NOT valid: {exc}") from None
    print(f"{args.file}: valid for node {info.node_id} ({info.name}) of cluster "
          f"{info.cluster_id} until {_when(info.not_after)}")
    return 0


def _cert_renew(args: argparse.Namespace) -> int:
    from meshnode.mesh.certs import renew_node_cert
    from meshnode.mesh.certverify import certificate_pem, inspect_node_cert
    from meshnode.mesh.crypto_errors import SecurityError

    cert = _load_node_cert(args.file)
    ca = _load_ca(args)
    try:
        new = renew_node_cert(ca, cert, days=args.days,
                              revocation=_revocation(args.ca_dir or _default_ca_dir(), ca.cert))
    except (SecurityError, ValueError) as exc:
        raise CliError(f"cannot renew {args.file}: {exc}") from None
    out = Path(args.out or args.file)
    _write(out, certificate_pem(new), 0o644)
    info = inspect_node_cert(new, ca.cert)
    print(f"renewed {info.name} ({info.node_id}): serial {info.serial:x}, until "
          f"{_when(info.not_after)}, in {out}")
    return 0


def _cert_revoke(args: argparse.Namespace) -> int:
    from meshnode.mesh.certverify import inspect_node_cert
    from meshnode.mesh.crypto_errors import SecurityError
    from meshnode.mesh.identity import is_key_id
    from meshnode.mesh.revocation import RevocationList, save_revocation

    serials: list[int] = []
    node_ids: list[str] = list(args.node_id or ())
    if not (args.file or node_ids or args.serial):
        raise CliError("name what to revoke: a certificate FILE, --node-id ID or --serial HEX")
    for n in node_ids:
        if not is_key_id(n):
            raise CliError(f"{n!r} is not a node id (26 characters a-z, 2-7)")
    try:
        serials += [int(s, 16) for s in args.serial or ()]
    except ValueError:
        raise CliError("--serial takes the hex serial that `meshnode cert show` prints")\
            from None
    ca = _load_ca(args)
    ca_dir = args.ca_dir or _default_ca_dir()
    if args.file:
        try:
            info = inspect_node_cert(_load_node_cert(args.file), ca.cert)
        except SecurityError as exc:
            raise CliError(f"{args.file}: {exc}") from None
        node_ids.append(info.node_id)
    prior = _revocation(ca_dir, ca.cert)
    rl = RevocationList.revoke(ca, prior, serials=serials, node_ids=node_ids)
    path = save_revocation(ca_dir, rl)
    print(f"revocation list sequence {rl.sequence} ({len(rl.node_ids)} nodes, "
          f"{len(rl.serials)} serials) saved in {path}")
    if args.endpoint:
        install_api_key(args.api_key)
        _post_bytes(AdminClient(args.endpoint).endpoint, "/v1/cluster/revocations",
                    rl.to_bytes())
        print(f"sent to {args.endpoint}; it spreads by gossip to every node")
    else:
        print("send it to the cluster with --endpoint URL (any node), or copy it into each "
              "node's data dir")
    return 0


def _post_bytes(endpoint: str, path: str, data: bytes) -> None:
    """POST raw bytes to a node's admin API (through the opener install_api_key set up)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(endpoint + path, data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            raise CliError(f"{endpoint} does not take revocation lists ({exc.code}); copy "
                           "revocation.bin into each node's data dir instead") from None
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CliError(f"error {exc.code}: {message}") from None
    except OSError as exc:
        raise CliError(f"cannot reach a node at {endpoint} ({exc}); the list is saved, send "
                       "it again later") from None


def add_security_commands(sub: Any) -> None:
    """Register `ca`, `cert` under the top-level subparsers `sub`."""
    def ca_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--ca-dir", help="the CA directory (default <data dir>/ca)")
        q.add_argument("--passphrase-file", metavar="FILE",
                       help=f"CA passphrase file (default: {PASSPHRASE_ENV}, else a prompt)")

    ca = sub.add_parser("ca", help="the cluster's certificate authority")
    casub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    p = casub.add_parser("init", help="create a cluster CA (prints its cluster id)")
    p.add_argument("--name", default="meshnode", help="the CA's name (default meshnode)")
    p.add_argument("--dir", help="where to put it (default <data dir>/ca)")
    p.add_argument("--no-passphrase", action="store_true",
                   help="store the CA key unencrypted (anyone who copies the file can sign)")
    p.add_argument("--passphrase-file", metavar="FILE")
    p.set_defaults(func=_ca_init)
    p = casub.add_parser("show", help="show the CA: cluster id, fingerprint, validity")
    p.add_argument("--dir", help="the CA directory (default <data dir>/ca)")
    p.set_defaults(func=_ca_show)

    cert = sub.add_parser("cert", help="node certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    p = csub.add_parser("pubkey", help="print this node's public key (PEM) to have it signed")
    p.add_argument("--data-dir", help="the node's data dir (its key is made if missing)")
    p.set_defaults(func=_cert_pubkey)
    p = csub.add_parser("issue", help="sign a node certificate")
    p.add_argument("--name", required=True, help="the node's name (certificate CN)")
    p.add_argument("--roles", metavar="R1,R2", help="roles carried by the certificate")
    p.add_argument("--days", type=int, default=90, help="validity (default 90)")
    p.add_argument("--public-key", metavar="FILE", help="the node's public key (PEM)")
    p.add_argument("--bundle", metavar="DIR", help="make a fresh key too, and write key, "
                                                   "certificate and CA certificate into DIR")
    p.add_argument("--out", metavar="FILE", help="certificate file (default NAME-cert.pem)")
    ca_args(p)
    p.set_defaults(func=_cert_issue)
    p = csub.add_parser("show", help="print a certificate's fields")
    p.add_argument("file")
    p.set_defaults(func=_cert_show)
    p = csub.add_parser("verify", help="check a certificate against the CA and revocations")
    p.add_argument("file")
    p.add_argument("--ca-cert", metavar="FILE", help="the CA certificate (default from --ca-dir)")
    p.add_argument("--ca-dir", help="the CA directory (default <data dir>/ca)")
    p.set_defaults(func=_cert_verify)
    p = csub.add_parser("renew", help="re-issue a certificate (same key, new expiry)")
    p.add_argument("file")
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--out", metavar="FILE", help="where to write it (default: replace FILE)")
    ca_args(p)
    p.set_defaults(func=_cert_renew)
    p = csub.add_parser("revoke", help="revoke node certificates cluster-wide")
    p.add_argument("file", nargs="?", help="a certificate to revoke (its node id is revoked)")
    p.add_argument("--node-id", action="append", metavar="ID")
    p.add_argument("--serial", action="append", metavar="HEX")
    p.add_argument("--endpoint", help="a running node to send the new list to")
    p.add_argument("--api-key", help="an admin key (default: MESHNODE_API_KEY)")
    ca_args(p)
    p.set_defaults(func=_cert_revoke)


