"""Loading a node's cluster identity (node/security.py): every refusal says what to do."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from meshnode.mesh.certs import init_ca, issue_node_bundle, issue_node_cert
from meshnode.mesh.certverify import certificate_pem
from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.revocation import RevocationList, save_revocation
from meshnode.node import ConfigError, NodeConfig
from meshnode.node.security import check_open_binding, load_security


@pytest.fixture
def setup(tmp_path: Path) -> tuple[object, Path, Path, NodeIdentity]:
    ca = init_ca(tmp_path / "ca", "test", None, allow_unencrypted=True)
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(certificate_pem(ca.cert))
    data = tmp_path / "data"
    identity = NodeIdentity.load_or_create(data)
    cert = tmp_path / "node.crt"
    cert.write_bytes(certificate_pem(issue_node_cert(ca, identity.public_key, "n1")))
    return ca, ca_pem, cert, identity


def config(tmp_path: Path, **kw: object) -> NodeConfig:
    return NodeConfig(data_dir=str(tmp_path / "data"), name="n1", **kw).resolved()  # type: ignore[arg-type]


def test_signed_node_loads(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    ca, ca_pem, cert, identity = setup
    sec = load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(cert)))
    assert sec is not None
    assert sec.node_id == identity.node_id and sec.cluster_id == ca.cluster_id
    assert sec.server_context().verify_mode.name == "CERT_REQUIRED"


def test_open_node_on_loopback_is_allowed(tmp_path: Path) -> None:
    assert load_security(config(tmp_path)) is None


@pytest.mark.parametrize("kw", [{"host": "0.0.0.0"}, {"bind": "0.0.0.0"},
                                {"host": "example.org"}])
def test_open_node_off_loopback_refused(tmp_path: Path, kw: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="--insecure") as err:
        check_open_binding(config(tmp_path, **kw))
    assert "--ca" in str(err.value)
    check_open_binding(config(tmp_path, insecure=True, **kw))  # told explicitly: allowed


def test_half_an_identity_is_refused(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    _, ca_pem, cert, _ = setup
    with pytest.raises(ConfigError, match="needs both --ca"):
        load_security(config(tmp_path, ca_cert=str(ca_pem)))
    with pytest.raises(ConfigError, match="file not found"):
        load_security(config(tmp_path, ca_cert=str(tmp_path / "nope.pem"), cert=str(cert)))


def test_certificate_of_another_ca_is_refused(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    _, _, cert, _ = setup
    other = init_ca(tmp_path / "other", "other", None, allow_unencrypted=True)
    other_pem = tmp_path / "other.pem"
    other_pem.write_bytes(certificate_pem(other.cert))
    with pytest.raises(ConfigError, match="not a node certificate of the cluster CA"):
        load_security(config(tmp_path, ca_cert=str(other_pem), cert=str(cert)))


def test_expired_certificate_is_refused(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    ca, ca_pem, _, identity = setup
    old = tmp_path / "old.crt"
    old.write_bytes(certificate_pem(issue_node_cert(
        ca, identity.public_key, "n1", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(2))))
    with pytest.raises(ConfigError, match="meshnode cert renew"):
        load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(old)))


def test_revoked_node_cannot_start_and_lists_only_grow(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    ca, ca_pem, cert, identity = setup
    sec = load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(cert)))
    assert sec is not None
    first = RevocationList.revoke(ca, None, node_ids=[NodeIdentity.generate().node_id])
    second = RevocationList.revoke(ca, first, node_ids=[identity.node_id])
    seen: list[frozenset[str]] = []
    sec.on_revoked.append(seen.append)
    assert sec.adopt_revocation(second.to_bytes()) is True
    assert sec.adopt_revocation(first.to_bytes()) is False  # lower sequence: ignored
    assert sec.revocation_seq == 2 and identity.node_id in seen[0]
    save_revocation(tmp_path / "data", second)
    with pytest.raises(ConfigError, match="is revoked"):
        load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(cert)))


def test_key_file_given_with_key(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    """--key: a key made elsewhere (a bundle from the CA holder), not the data dir's."""
    ca, ca_pem, _, identity = setup
    bundle = issue_node_bundle(ca, "n2")
    key = tmp_path / "n2.key"
    key.write_bytes(bundle.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    cert = tmp_path / "n2.crt"
    cert.write_bytes(certificate_pem(bundle.cert))
    sec = load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(cert), key=str(key)))
    assert sec is not None and sec.node_id == bundle.node_id != identity.node_id
    key.chmod(0o644)  # readable by others: refused, saying why
    with pytest.raises(ConfigError, match="key file"):
        load_security(config(tmp_path, ca_cert=str(ca_pem), cert=str(cert), key=str(key)))
