"""Cluster CA, node certificates, revocation lists and invite tokens."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtensionOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.mesh.certs import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    ClusterCA,
    init_ca,
    issue_node_bundle,
    issue_node_cert,
    load_ca,
    renew_node_cert,
)
from meshnode.mesh.certverify import (
    certificate_fingerprint,
    certificate_pem,
    cluster_id_of,
    load_certificate,
    verify_node_cert,
)
from meshnode.mesh.crypto_errors import (
    CAExistsError,
    CANotFoundError,
    CAPassphraseError,
    CertificateError,
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertificateParseError,
    CertificateRevokedError,
    ClusterMismatchError,
    FilePermissionError,
    FingerprintMismatchError,
    InvalidNodeCertificateError,
    InviteExpiredError,
    InviteFormatError,
    InviteUnknownError,
    InviteUsedError,
    RevocationFormatError,
    RevocationSignatureError,
    UntrustedCertificateError,
)
from meshnode.mesh.identity import NodeIdentity, key_id, raw_public_key
from meshnode.mesh.invite import (
    InviteStore,
    accept_join_response,
    create_invite,
    handle_join_request,
    make_join_request,
    parse_invite,
    pinned_ca_certificate,
)
from meshnode.mesh.revocation import (
    RevocationList,
    load_revocation,
    merge_revocations,
    save_revocation,
)

UTC = dt.UTC


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> ClusterCA:
    return init_ca(tmp_path_factory.mktemp("ca"), "test-cluster", b"correct horse")


@pytest.fixture(scope="module")
def rogue_ca(tmp_path_factory) -> ClusterCA:
    # Same subject name as the real CA, different key: must still be refused.
    return init_ca(tmp_path_factory.mktemp("rogue"), "test-cluster", None, allow_unencrypted=True)


def forge(
    signer: Ed25519PrivateKey,
    issuer: x509.Name,
    *,
    key: Ed25519PrivateKey | None = None,
    uris: list[str] | None = None,
    name: str = "forged",
    ca: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate with whatever content a test needs, signed by `signer`."""
    key = key or Ed25519PrivateKey.generate()
    now = dt.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=1))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if uris == []:  # cryptography >= 51 builds no empty SAN: write its DER (an empty SEQUENCE)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x00"),
            critical=False,
        )
    elif uris is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(signer, None)


def node_uri(cluster_id: str, key: Ed25519PrivateKey) -> str:
    return f"meshnode://{cluster_id}/{key_id(raw_public_key(key))}"


# -- CA -------------------------------------------------------------------------------------------


def test_ca_files_and_extensions(tmp_path):
    ca = init_ca(tmp_path, "prod", b"secret")
    assert stat.S_IMODE((tmp_path / CA_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / CA_CERT_FILE).stat().st_mode) == 0o644
    assert (tmp_path / CA_KEY_FILE).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.cluster_id == key_id(raw_public_key(ca.private_key)) == cluster_id_of(ca.cert)
    assert ca.cert.subject == ca.cert.issuer
    ca.cert.verify_directly_issued_by(ca.cert)  # self-signed
    assert ca.fingerprint == certificate_fingerprint(ca.cert) and len(ca.fingerprint) == 32


def test_ca_load_and_passphrase(tmp_path):
    ca = init_ca(tmp_path, "prod", b"secret")
    loaded = load_ca(tmp_path, b"secret")
    assert loaded.cluster_id == ca.cluster_id and loaded.cert == ca.cert
    with pytest.raises(CAPassphraseError):
        load_ca(tmp_path, b"wrong")
    with pytest.raises(CAPassphraseError):
        load_ca(tmp_path, None)
    with pytest.raises(CAExistsError):
        init_ca(tmp_path, "again", b"x")
    with pytest.raises(CANotFoundError):
        load_ca(tmp_path / "nothing", b"x")
    os.chmod(tmp_path / CA_KEY_FILE, 0o640)
    with pytest.raises(FilePermissionError):
        load_ca(tmp_path, b"secret")


def test_ca_unencrypted_only_when_asked(tmp_path):
    with pytest.raises(CAPassphraseError):
        init_ca(tmp_path / "a", "c", None)
    assert not (tmp_path / "a" / CA_KEY_FILE).exists()
    with pytest.raises(CAPassphraseError):
        init_ca(tmp_path / "b", "c", b"")
    ca = init_ca(tmp_path / "c", "c", None, allow_unencrypted=True)
    assert (tmp_path / "c" / CA_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    assert load_ca(tmp_path / "c", None).cluster_id == ca.cluster_id


# -- node certificates ----------------------------------------------------------------------------


def test_issue_and_verify(ca):
    ident = NodeIdentity.generate()
    now = dt.datetime.now(UTC)
    cert = issue_node_cert(
        ca, ident.public_key_bytes, "gpu-box-1", ["worker", "admin", "worker"], now=now
    )
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"meshnode://{ca.cluster_id}/{ident.node_id}",
        "meshnode-role:admin",
        "meshnode-role:worker",
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gpu-box-1"
    assert cert.not_valid_after_utc - now == dt.timedelta(days=90) - dt.timedelta(
        microseconds=now.microsecond
    )
    info = verify_node_cert(cert, ca.cert)
    assert (info.node_id, info.cluster_id, info.name, info.roles) == (
        ident.node_id,
        ca.cluster_id,
        "gpu-box-1",
        ("admin", "worker"),
    )
    assert info.serial == cert.serial_number and info.not_after == cert.not_valid_after_utc
    # PEM and DER bytes go through the same checks.
    assert verify_node_cert(certificate_pem(cert), ca.cert) == info
    assert verify_node_cert(cert.public_bytes(serialization.Encoding.DER), ca.cert) == info


def test_issue_rejects_bad_input(ca):
    key = NodeIdentity.generate().public_key
    for bad in (
        dict(name=""),
        dict(name="x" * 65),
        dict(name="a\nb"),
        dict(roles=["Admin"]),
        dict(roles=["a b"]),
        dict(roles=[f"r{i}" for i in range(17)]),
        dict(days=0),
    ):
        kwargs = {"name": "ok", "roles": (), "days": 90} | bad
        with pytest.raises(ValueError):
            issue_node_cert(ca, key, kwargs["name"], kwargs["roles"], days=kwargs["days"])
    with pytest.raises(ValueError):
        issue_node_cert(ca, b"short", "ok")


def test_bundle(ca):
    bundle = issue_node_bundle(ca, "n1", ["worker"], days=7)
    info = verify_node_cert(bundle.cert, ca.cert)
    assert info.node_id == bundle.node_id == key_id(raw_public_key(bundle.private_key))
    assert "private_key" not in repr(bundle)


def test_rogue_ca_refused(ca, rogue_ca):
    assert rogue_ca.cert.subject == ca.cert.subject
    rogue = issue_node_bundle(rogue_ca, "evil")
    with pytest.raises(UntrustedCertificateError):
        verify_node_cert(rogue.cert, ca.cert)
    # Claims our cluster in its SAN, signed by the rogue key under our CA's name.
    key = Ed25519PrivateKey.generate()
    forged = forge(
        rogue_ca.private_key, ca.cert.subject, key=key, uris=[node_uri(ca.cluster_id, key)]
    )
    with pytest.raises(UntrustedCertificateError):
        verify_node_cert(forged, ca.cert)


def test_self_signed_node_cert_refused(ca):
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.now(UTC) - dt.timedelta(hours=1))
        .not_valid_after(dt.datetime.now(UTC) + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(node_uri(ca.cluster_id, key))]
            ),
            critical=False,
        )
        .sign(key, None)
    )
    with pytest.raises(UntrustedCertificateError):
        verify_node_cert(cert, ca.cert)


def test_ca_cert_is_not_a_node_cert(ca):
    with pytest.raises(InvalidNodeCertificateError):
        verify_node_cert(ca.cert, ca.cert)


def test_wrong_cluster_id_refused(ca, rogue_ca):
    key = Ed25519PrivateKey.generate()
    cert = forge(
        ca.private_key, ca.cert.subject, key=key, uris=[node_uri(rogue_ca.cluster_id, key)]
    )
    with pytest.raises(ClusterMismatchError):
        verify_node_cert(cert, ca.cert)


@pytest.mark.parametrize(
    "uris",
    [
        None,
        [],
        ["meshnode-role:worker"],
        ["meshnode://short/id"],
        ["TWO", "TWO"],
        ["OTHER_KEY"],
        ["SELF", "meshnode-role:BAD ROLE"],
    ],
    ids=[
        "no-san",
        "empty-san",
        "no-node-uri",
        "malformed",
        "two-node-uris",
        "other-key",
        "bad-role",
    ],
)
def test_malformed_node_cert_refused(ca, uris):
    key = Ed25519PrivateKey.generate()
    subst = {
        "TWO": node_uri(ca.cluster_id, key),
        "SELF": node_uri(ca.cluster_id, key),
        "OTHER_KEY": node_uri(ca.cluster_id, Ed25519PrivateKey.generate()),
    }
    if uris is not None:
        uris = [subst.get(u, u) for u in uris]
    with pytest.raises(InvalidNodeCertificateError):
        verify_node_cert(forge(ca.private_key, ca.cert.subject, key=key, uris=uris), ca.cert)


def test_validity_window(ca):
    cert = issue_node_cert(ca, NodeIdentity.generate().public_key, "n", days=1)
    now = dt.datetime.now(UTC)
    verify_node_cert(cert, ca.cert, now)
    verify_node_cert(cert, ca.cert, now - dt.timedelta(minutes=4))  # clock skew tolerance
    with pytest.raises(CertificateExpiredError):
        verify_node_cert(cert, ca.cert, now + dt.timedelta(days=1, minutes=1))
    with pytest.raises(CertificateNotYetValidError):
        verify_node_cert(cert, ca.cert, now - dt.timedelta(minutes=6))
    with pytest.raises(ValueError):
        verify_node_cert(cert, ca.cert, dt.datetime.now())  # naive datetime


def test_expired_ca_refuses_everything(tmp_path):
    past = dt.datetime.now(UTC) - dt.timedelta(days=30)
    ca = init_ca(tmp_path, "old", b"pw", days=10, now=past)
    cert = issue_node_cert(ca, NodeIdentity.generate().public_key, "n", days=90, now=past)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc  # capped by the CA
    with pytest.raises(CertificateExpiredError, match="CA"):
        verify_node_cert(cert, ca.cert)


def test_renew_keeps_key_and_roles(ca):
    bundle = issue_node_bundle(ca, "n", ["worker"], days=1)
    later = dt.datetime.now(UTC) + dt.timedelta(days=2)
    renewed = renew_node_cert(ca, bundle.cert, days=30, now=later)
    info = verify_node_cert(renewed, ca.cert, later)
    assert info.node_id == bundle.node_id and info.roles == ("worker",) and info.name == "n"
    assert renewed.serial_number != bundle.cert.serial_number
    assert renewed.not_valid_after_utc > bundle.cert.not_valid_after_utc


def test_renew_refuses_foreign_and_revoked(ca, rogue_ca):
    with pytest.raises(UntrustedCertificateError):
        renew_node_cert(ca, issue_node_bundle(rogue_ca, "x").cert)
    bundle = issue_node_bundle(ca, "n")
    rl = RevocationList.revoke(ca, None, node_ids=[bundle.node_id])
    with pytest.raises(CertificateRevokedError):
        renew_node_cert(ca, bundle.cert, revocation=rl)


# -- revocation -----------------------------------------------------------------------------------


def test_revoked_by_serial_and_by_node_id(ca):
    a, b, c = (issue_node_bundle(ca, n) for n in "abc")
    rl = RevocationList.revoke(ca, None, serials=[a.cert.serial_number], node_ids=[b.node_id])
    assert rl.sequence == 1
    with pytest.raises(CertificateRevokedError):
        verify_node_cert(a.cert, ca.cert, revocation=rl)
    with pytest.raises(CertificateRevokedError):
        verify_node_cert(b.cert, ca.cert, revocation=rl)
    # Revoking a node id also covers its renewed certificates.
    with pytest.raises(CertificateRevokedError):
        verify_node_cert(renew_node_cert(ca, b.cert), ca.cert, revocation=rl)
    assert verify_node_cert(c.cert, ca.cert, revocation=rl).node_id == c.node_id


def test_revocation_roundtrip_and_signature(ca, rogue_ca):
    rl1 = RevocationList.revoke(
        ca, None, serials=[2**158 + 5], node_ids=[NodeIdentity.generate().node_id]
    )
    rl2 = RevocationList.revoke(ca, rl1, serials=[7])
    assert rl2.sequence == 2 and rl1.serials | {7} == rl2.serials and rl1.node_ids == rl2.node_ids
    parsed = RevocationList.from_bytes(rl2.to_bytes())
    assert not parsed.verified
    parsed.verify(ca.public_key)
    assert parsed.verified and parsed.serials == rl2.serials and parsed.sequence == 2
    with pytest.raises(RevocationSignatureError):
        RevocationList.from_bytes(rl2.to_bytes()).verify(rogue_ca.public_key)
    # A list signed by a rogue key claiming our cluster id.
    fake = ClusterCA(cert=ca.cert, private_key=rogue_ca.private_key, cluster_id=ca.cluster_id)
    forged = RevocationList.from_bytes(RevocationList.create(fake, sequence=9).to_bytes())
    with pytest.raises(RevocationSignatureError):
        forged.verify(ca.public_key)
    # verify_node_cert refuses to use an unverifiable list rather than ignore it.
    with pytest.raises(RevocationSignatureError):
        verify_node_cert(issue_node_bundle(ca, "n").cert, ca.cert, revocation=forged)


def test_revocation_tampering_detected(ca):
    data = bytearray(RevocationList.revoke(ca, None, serials=[12345]).to_bytes())
    for i in range(len(data)):
        mutated = bytes(data[:i]) + bytes([data[i] ^ 0x01]) + bytes(data[i + 1 :])
        try:
            RevocationList.from_bytes(mutated).verify(ca.public_key)
        except (RevocationFormatError, RevocationSignatureError):
            continue
        raise AssertionError(f"flipped byte {i} accepted")


def test_revocation_merge_rule(ca, rogue_ca):
    rl1 = RevocationList.revoke(ca, None, serials=[1])
    rl2 = RevocationList.revoke(ca, rl1, serials=[2])
    assert merge_revocations(None, rl1.to_bytes(), ca.public_key).sequence == 1
    assert merge_revocations(rl1, rl2.to_bytes(), ca.public_key).sequence == 2
    assert merge_revocations(rl2, rl1, ca.public_key) is rl2  # lower ignored
    same_seq = RevocationList.create(ca, sequence=2, serials=[99])
    assert merge_revocations(rl2, same_seq, ca.public_key) is rl2  # equal ignored
    fake = ClusterCA(cert=ca.cert, private_key=rogue_ca.private_key, cluster_id=ca.cluster_id)
    with pytest.raises(RevocationSignatureError):
        merge_revocations(rl2, RevocationList.create(fake, sequence=50).to_bytes(), ca.public_key)
    with pytest.raises(RevocationFormatError):
        merge_revocations(rl2, b"\x00junk", ca.public_key)


def test_revocation_persisted(tmp_path, ca, rogue_ca):
    assert load_revocation(tmp_path, ca.public_key) is None
    rl = RevocationList.revoke(ca, None, serials=[3], node_ids=[NodeIdentity.generate().node_id])
    save_revocation(tmp_path, rl)
    loaded = load_revocation(tmp_path, ca.public_key)
    assert loaded is not None and loaded.verified and loaded.to_bytes() == rl.to_bytes()
    with pytest.raises(RevocationSignatureError):
        load_revocation(tmp_path, rogue_ca.public_key)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_revocation_bytes(data):
    with contextlib.suppress(RevocationFormatError):
        RevocationList.from_bytes(data)


# -- certificate parsing fuzz ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=600)
    | st.binary(max_size=400).map(
        lambda b: (
            b"-----BEGIN CERTIFICATE-----\n"
            + base64.encodebytes(b)
            + b"-----END CERTIFICATE-----\n"
        )
    )
)
def test_fuzz_load_certificate_random(data):
    with contextlib.suppress(CertificateParseError):
        load_certificate(data)


@pytest.fixture(scope="module")
def fuzz_cert(ca) -> x509.Certificate:
    return issue_node_bundle(ca, "fuzz", ["worker"]).cert


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_certificate(ca, fuzz_cert, data):
    cert = fuzz_cert
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        der = der[: data.draw(st.integers(0, len(der)))]
    try:
        info = verify_node_cert(bytes(der), ca.cert)
    except CertificateError:
        return
    # Only an encoding-equivalent certificate may pass, and it must say the same thing.
    assert info == verify_node_cert(cert, ca.cert)


# -- invites --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> InviteStore:
    return InviteStore(tmp_path / "ca" / "invites.json")


def test_invite_token_roundtrip(ca, store):
    token = create_invite(ca, "10.0.0.5:7701", 600, store=store, now=1000.0)
    assert token.startswith("mni1_") and token.isprintable() and len(token) < 200
    invite = parse_invite(token)
    assert invite.address == "10.0.0.5:7701" and invite.ca_fingerprint == ca.fingerprint
    assert invite.expires_at == 1600 and len(invite.secret) == 32
    assert invite.secret.hex() not in repr(invite)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert invite.secret.hex().encode() not in store.path.read_bytes()  # only the hash is kept
    with pytest.raises(InviteExpiredError):
        parse_invite(token, now=1600.0)
    for bad in ("", "mni1_", "mni1_!!!", "xyz_" + token[5:], token[:-10], "mni1_" + "A" * 2000):
        with pytest.raises(InviteFormatError):
            parse_invite(bad)


def _join(ca, store, token, ident, name="joiner", now=None):
    invite = parse_invite(token)
    body = handle_join_request(
        ca, store, make_join_request(invite, ident.public_key_bytes, name), now=now
    )
    return accept_join_response(invite, body, ident.public_key_bytes)


def test_invite_redeemed_once(ca, store):
    token = create_invite(ca, "h:1", 600, store=store, roles=["worker"])
    ident = NodeIdentity.generate()
    cert, ca_cert, info = _join(ca, store, token, ident)
    assert ca_cert == ca.cert and info.node_id == ident.node_id and info.roles == ("worker",)
    assert verify_node_cert(cert, ca.cert).name == "joiner"
    with pytest.raises(InviteUsedError):
        _join(ca, store, token, NodeIdentity.generate())
    assert store.pending(now=0) == 0


def test_invite_expired_and_unknown(ca, store, tmp_path):
    token = create_invite(ca, "h:1", 60, store=store, now=1000.0)
    with pytest.raises(InviteExpiredError):
        _join(ca, store, token, NodeIdentity.generate(), now=1060.0)
    other = InviteStore(tmp_path / "other.json")
    with pytest.raises(InviteUnknownError):
        _join(ca, other, token, NodeIdentity.generate(), now=1000.0)
    # Expired entries are pruned on the next write; the token stays refused.
    create_invite(ca, "h:1", 60, store=store, now=5000.0)
    with pytest.raises(InviteUnknownError):
        _join(ca, store, token, NodeIdentity.generate(), now=5001.0)


def test_bad_join_request_does_not_consume(ca, store):
    token = create_invite(ca, "h:1", 600, store=store)
    invite = parse_invite(token)
    for body in (
        b"junk",
        make_join_request(invite, b"\x01" * 31, "n"),
        make_join_request(invite, NodeIdentity.generate().public_key_bytes, ""),
    ):
        with pytest.raises(InviteFormatError):
            handle_join_request(ca, store, body)
    assert store.pending(now=0) == 1
    _join(ca, store, token, NodeIdentity.generate())


def test_join_response_pinned(ca, rogue_ca, store):
    token = create_invite(ca, "h:1", 600, store=store)
    invite = parse_invite(token)
    ident = NodeIdentity.generate()
    # A server holding a different CA (same name) cannot satisfy the pin.
    rogue_store = InviteStore(store.path.with_name("rogue.json"))
    rogue_store.add(invite.secret, 10**10, now=0)
    body = handle_join_request(
        rogue_ca, rogue_store, make_join_request(invite, ident.public_key_bytes, "n")
    )
    with pytest.raises(FingerprintMismatchError):
        accept_join_response(invite, body, ident.public_key_bytes)
    with pytest.raises(FingerprintMismatchError):
        pinned_ca_certificate(certificate_pem(rogue_ca.cert), invite.ca_fingerprint)
    assert pinned_ca_certificate(certificate_pem(ca.cert), invite.ca_fingerprint) == ca.cert
    # A response for somebody else's key is refused.
    body = handle_join_request(ca, store, make_join_request(invite, ident.public_key_bytes, "n"))
    with pytest.raises(FingerprintMismatchError):
        accept_join_response(invite, body, NodeIdentity.generate().public_key_bytes)


def test_concurrent_redeem_only_one_wins(ca, store):
    token = create_invite(ca, "h:1", 600, store=store)
    invite = parse_invite(token)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def redeem() -> None:
        body = make_join_request(invite, NodeIdentity.generate().public_key_bytes, "n")
        barrier.wait()
        try:
            handle_join_request(ca, InviteStore(store.path), body)
            outcomes.append("ok")
        except InviteUsedError:
            outcomes.append("used")

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["used"] * 7
