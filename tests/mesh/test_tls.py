"""Mutual TLS with the cluster CA as the only root: real asyncio server and client on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshnode.mesh.certs import ClusterCA, NodeBundle, init_ca, issue_node_bundle
from meshnode.mesh.certverify import NodeCertInfo, certificate_pem
from meshnode.mesh.crypto_errors import (
    CertificateExpiredError,
    CertificateRevokedError,
    ClusterMismatchError,
    FingerprintMismatchError,
    NodeIdMismatchError,
    PeerCertificateMissingError,
    SecurityError,
)
from meshnode.mesh.identity import NodeIdentity, key_id, raw_public_key
from meshnode.mesh.invite import (
    InviteStore,
    accept_join_response,
    create_invite,
    handle_join_request,
    make_join_request,
    parse_invite,
    pinned_client_context,
)
from meshnode.mesh.revocation import RevocationList
from meshnode.mesh.tls import bootstrap_client_context, check_peer, client_context, server_context

UTC = dt.UTC
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> ClusterCA:
    return init_ca(tmp_path_factory.mktemp("ca"), "cluster", b"pw")


@pytest.fixture(scope="module")
def rogue_ca(tmp_path_factory) -> ClusterCA:
    return init_ca(tmp_path_factory.mktemp("rogue"), "cluster", b"pw")


@pytest.fixture(scope="module")
def alice(ca) -> NodeBundle:
    return issue_node_bundle(ca, "alice", ["worker"])


@pytest.fixture(scope="module")
def bob(ca) -> NodeBundle:
    return issue_node_bundle(ca, "bob")


@dataclass
class Server:
    port: int
    infos: list[NodeCertInfo] = field(default_factory=list)
    errors: list[SecurityError] = field(default_factory=list)
    handled: int = 0


@contextlib.asynccontextmanager
async def serve(
    ctx: ssl.SSLContext, ca: ClusterCA, revocation: RevocationList | None = None, *, join_store=None
) -> AsyncIterator[Server]:
    """Echo server that runs check_peer, or the join endpoint when `join_store` is given."""
    server = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.handled += 1
        try:
            if join_store is not None:  # 1st line: "ca" or a join request
                request = await reader.read(65536)
                if request == b"ca":
                    writer.write(certificate_pem(ca.cert))
                else:
                    writer.write(handle_join_request(ca, join_store, request))
                await writer.drain()
                return
            try:
                info = check_peer(writer.get_extra_info("ssl_object"), ca.cert, revocation)
            except SecurityError as e:
                server.errors.append(e)
                return
            server.infos.append(info)
            await reader.read(100)
            writer.write(b"pong:" + info.node_id.encode())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        srv.close()
        await srv.wait_closed()


async def exchange(ctx: ssl.SSLContext, port: int, message: bytes = b"ping") -> bytes | Exception:
    """One request/response; the error instead of raising when TLS refuses the connection."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="not-a-node-name"),
            TIMEOUT_S,
        )
    except (ssl.SSLError, ConnectionError) as e:
        return e
    try:
        writer.write(message)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), TIMEOUT_S)
    except (ssl.SSLError, ConnectionError) as e:
        return e
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def refused(result: bytes | Exception) -> bool:
    return isinstance(result, Exception) or result == b""


def test_contexts_trust_only_the_cluster_ca(ca, alice):
    for ctx in (
        server_context(alice.cert, alice.private_key, ca.cert),
        client_context(alice.cert, alice.private_key, ca.cert),
    ):
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "cluster"),),)]
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert not ctx.check_hostname


async def test_mutual_tls_handshake(ca, alice, bob):
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        client = client_context(bob.cert, bob.private_key, ca.cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client)
        try:
            sslobj = writer.get_extra_info("ssl_object")
            assert sslobj.version() == "TLSv1.3"
            info = check_peer(sslobj, ca.cert, expected_node_id=alice.node_id)
            assert (info.name, info.roles) == ("alice", ("worker",))
            with pytest.raises(NodeIdMismatchError):
                check_peer(sslobj, ca.cert, expected_node_id=bob.node_id)
            with pytest.raises(CertificateExpiredError):
                check_peer(sslobj, ca.cert, now=dt.datetime.now(UTC) + dt.timedelta(days=91))
            writer.write(b"ping")
            assert (
                await asyncio.wait_for(reader.read(100), TIMEOUT_S)
                == b"pong:" + bob.node_id.encode()
            )
        finally:
            writer.close()
            await writer.wait_closed()
    assert [i.node_id for i in server.infos] == [bob.node_id] and not server.errors


async def test_rogue_client_refused_by_handshake(ca, rogue_ca, alice):
    rogue = issue_node_bundle(rogue_ca, "evil")
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        # The rogue trusts our CA (to get past its own check) but its certificate is foreign.
        assert refused(
            await exchange(client_context(rogue.cert, rogue.private_key, ca.cert), server.port)
        )
    assert server.handled == 0


async def test_rogue_server_refused_by_client(ca, rogue_ca, alice):
    rogue = issue_node_bundle(rogue_ca, "evil")
    async with serve(server_context(rogue.cert, rogue.private_key, ca.cert), ca) as server:
        result = await exchange(client_context(alice.cert, alice.private_key, ca.cert), server.port)
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert server.handled == 0


def _self_signed(cluster_id: str) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster")])  # CA's name
    now = dt.datetime.now(UTC)
    node = f"meshnode://{cluster_id}/{key_id(raw_public_key(key))}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(node)]), False)
        .sign(key, None)
    )
    return cert, key


async def test_self_signed_client_refused(ca, alice):
    cert, key = _self_signed(ca.cluster_id)
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        assert refused(await exchange(client_context(cert, key, ca.cert), server.port))
    assert server.handled == 0


async def test_client_without_certificate_refused(ca, alice):
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        assert refused(await exchange(client_context(None, None, ca.cert), server.port))
    assert server.handled == 0


async def test_expired_client_refused_by_handshake(ca, alice):
    past = dt.datetime.now(UTC) - dt.timedelta(days=10)
    old = issue_node_bundle(ca, "old", days=1, now=past)
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        assert refused(
            await exchange(client_context(old.cert, old.private_key, ca.cert), server.port)
        )
    assert server.handled == 0


async def test_tls12_client_refused(ca, alice, bob):
    ctx = client_context(bob.cert, bob.private_key, ca.cert)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        assert refused(await exchange(ctx, server.port))
    assert server.handled == 0


def _other_cluster_cert(
    ca: ClusterCA, other_cluster_id: str
) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """Signed by our CA, but its SAN names another cluster: only check_peer can catch it."""
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(UTC)
    node = f"meshnode://{other_cluster_id}/{key_id(raw_public_key(key))}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stray")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(node)]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key), False)
        .sign(ca.private_key, None)
    )
    return cert, key


async def test_wrong_cluster_refused_by_check_peer(ca, rogue_ca, alice):
    cert, key = _other_cluster_cert(ca, rogue_ca.cluster_id)
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        assert refused(await exchange(client_context(cert, key, ca.cert), server.port))
    assert server.handled == 1 and not server.infos
    assert [type(e) for e in server.errors] == [ClusterMismatchError]


async def test_revoked_peer_refused_by_check_peer(ca, alice, bob):
    rl = RevocationList.revoke(ca, None, node_ids=[bob.node_id])
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca, rl) as server:
        assert refused(
            await exchange(client_context(bob.cert, bob.private_key, ca.cert), server.port)
        )
        carol = issue_node_bundle(ca, "carol")
        reply = await exchange(client_context(carol.cert, carol.private_key, ca.cert), server.port)
        assert reply == b"pong:" + carol.node_id.encode()
    assert [type(e) for e in server.errors] == [CertificateRevokedError]


def test_check_peer_needs_tls(ca):
    with pytest.raises(PeerCertificateMissingError):
        check_peer(None, ca.cert)


async def test_join_over_pinned_tls(ca, rogue_ca, alice, tmp_path):
    store = InviteStore(tmp_path / "invites.json")
    invite = parse_invite(create_invite(ca, "127.0.0.1:0", 600, store=store, roles=["worker"]))
    joiner = NodeIdentity.generate()
    join_ctx = server_context(alice.cert, alice.private_key, ca.cert, require_client_cert=False)
    async with serve(join_ctx, ca, join_store=store) as server:
        # 1. The CA certificate is public: fetched without verification, then checked by pin.
        ca_pem = await exchange(bootstrap_client_context(), server.port, b"ca")
        assert isinstance(ca_pem, bytes)
        pinned = pinned_client_context(invite.ca_fingerprint, ca_pem)
        # 2. The secret goes only over the pinned connection.
        request = make_join_request(invite, joiner.public_key_bytes, "joiner")
        body = await exchange(pinned, server.port, request)
        assert isinstance(body, bytes)
        cert, ca_cert, info = accept_join_response(invite, body, joiner.public_key_bytes)
        assert info.node_id == joiner.node_id and info.roles == ("worker",)
    with pytest.raises(FingerprintMismatchError):
        pinned_client_context(invite.ca_fingerprint, certificate_pem(rogue_ca.cert))
    # The pinned context refuses a server whose chain leads to another CA.
    rogue = issue_node_bundle(rogue_ca, "evil")
    async with serve(
        server_context(rogue.cert, rogue.private_key, rogue_ca.cert, require_client_cert=False),
        rogue_ca,
        join_store=store,
    ) as server:
        assert isinstance(
            await exchange(pinned, server.port, request), ssl.SSLCertVerificationError
        )
    # The new certificate works for mutual TLS at once.
    async with serve(server_context(alice.cert, alice.private_key, ca.cert), ca) as server:
        reply = await exchange(client_context(cert, joiner.private_key, ca_cert), server.port)
    assert reply == b"pong:" + joiner.node_id.encode()


async def test_optional_client_cert_listener_still_identifies(ca, alice):
    """With require_client_cert=False, a certless peer is only caught by check_peer."""
    ctx = server_context(alice.cert, alice.private_key, ca.cert, require_client_cert=False)
    async with serve(ctx, ca) as server:
        assert refused(await exchange(client_context(None, None, ca.cert), server.port))
    assert [type(e) for e in server.errors] == [PeerCertificateMissingError]
