"""A signed cluster of real `meshnode start` processes on loopback, certificates made by the library.

One module-scoped cluster of three signed nodes (a, b, c); the tests run in file order: the
cluster forms and a forwarded chat request works over mTLS (one model load), rogue nodes (own
CA; self-signed certificate) never get in, the internal listener refuses a caller without a
client certificate and the public one does not serve node-to-node routes, and last, c is
revoked: evicted from every node's membership, and refused when it comes back. Start-time
refusals (expired certificate, certificate of another key, open node off loopback) need no
cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NodeProcess, get_json, needs_llama, wait_for, write_gguf
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from meshnode.mesh.certs import ClusterCA, init_ca, issue_node_cert
from meshnode.mesh.certverify import certificate_pem
from meshnode.mesh.identity import NodeIdentity, key_id, raw_public_key
from meshnode.mesh.revocation import RevocationList
from meshnode.mesh.tls import client_context

CHAT = "smollm2-135m-instruct"
pytestmark = [pytest.mark.cluster]
ENV = {"MESHNODE_API_KEYS": "off"}  # API keys are another test's business



def call(url: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Pki:
    """A cluster CA in a tmp dir, and node certificates for data dirs."""

    def __init__(self, root: Path, name: str = "test") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca: ClusterCA = init_ca(root / "ca", name, None, allow_unencrypted=True)
        self.ca_pem = root / "ca.pem"
        self.ca_pem.write_bytes(certificate_pem(self.ca.cert))

    def node(self, name: str, *, days: int = 30, now: dt.datetime | None = None
             ) -> tuple[Path, Path, str]:
        """(data dir, certificate file, node id) for a node whose key is in its data dir."""
        data = self.root / name
        identity = NodeIdentity.load_or_create(data)
        cert = issue_node_cert(self.ca, identity.public_key, name, days=days, now=now)
        path = self.root / f"{name}.crt"
        path.write_bytes(certificate_pem(cert))
        return data, path, identity.node_id


def start_signed(pki: Pki, name: str, seed: str | None = None, *extra: str) -> NodeProcess:
    data, cert = pki.root / name, pki.root / f"{name}.crt"
    if not cert.exists():
        pki.node(name)
    args = ["--name", name, "--mesh-preset", "local", "--ca", str(pki.ca_pem), "--cert",
            str(cert), "--internal-port", "0", *extra]
    if seed:
        args += ["--join", seed]
    return NodeProcess(data, *args, env=ENV)


def members(node: NodeProcess) -> dict[str, str]:
    return {m["name"]: m["state"] for m in get_json(node.url + "/v1/cluster/nodes")["data"]}


def alive(node: NodeProcess) -> set[str]:
    return {n for n, s in members(node).items() if s == "alive"}


def internal_url(node: NodeProcess) -> str:
    text = node.log_path.read_text()
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "node.internal":
            return str(event["url"])
    raise KeyError("no node.internal line")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("signed"))


@pytest.fixture(scope="module")
def cluster(pki: Pki) -> Iterator[dict[str, NodeProcess]]:
    nodes: dict[str, NodeProcess] = {}
    try:
        nodes["a"] = start_signed(pki, "a")
        nodes["b"] = start_signed(pki, "b", nodes["a"].gossip)
        nodes["c"] = start_signed(pki, "c", nodes["a"].gossip)
        for n in nodes.values():
            wait_for(lambda n=n: alive(n) == {"a", "b", "c"}, 30, f"{n.url} sees a, b, c")
        yield nodes
    finally:
        for n in nodes.values():
            n.stop()


def test_signed_nodes_form_a_cluster(cluster: dict[str, NodeProcess]) -> None:
    for n in cluster.values():
        assert alive(n) == {"a", "b", "c"}


@needs_llama
def test_forwarded_chat_goes_over_mtls(cluster: dict[str, NodeProcess]) -> None:
    a = cluster["a"]
    status, _, body = call(a.url + "/v1/deployments", "POST",
                           json.dumps({"model": CHAT}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 201, body
    a.wait_ready(CHAT)
    view = get_json(a.url + f"/v1/deployments/{CHAT}")
    holder = next(p["node"] for p in view["placed"] if p["state"] == "ready")
    sender = next(n for name, n in cluster.items() if name != holder)
    sender.wait_ready(CHAT)  # it has seen the holder's ready replica (gossip)
    req = {"model": CHAT, "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": "Hi"}]}
    status, headers, body = call(sender.url + "/v1/chat/completions", "POST",
                                 json.dumps(req).encode(), {"Content-Type": "application/json"})
    assert status == 200, body
    assert headers["X-Served-By"] == holder
    assert json.loads(body)["choices"][0]["message"]["content"]
    # The public listener of a signed node ignores the hop header: a client cannot make it
    # serve locally what it does not hold (it is routed to the holder like any request).
    status, headers, _ = call(sender.url + "/v1/chat/completions", "POST",
                              json.dumps(req).encode(),
                              {"Content-Type": "application/json", "X-Meshnode-Hop": "1"})
    assert status == 200 and headers["X-Served-By"] == holder


def test_public_listener_serves_no_internal_routes(cluster: dict[str, NodeProcess]) -> None:
    status, _, _ = call(cluster["a"].url + "/internal/v1/deployments")
    assert status == 404
    status, _, _ = call(cluster["a"].url + "/internal/v1/revocation")
    assert status == 404


def test_a_path_lookup_asks_the_peers_over_mtls(cluster: dict[str, NodeProcess],
                                                tmp_path: Path) -> None:
    """A launch by a path this node lacks asks b and c on their mTLS listeners: both answer
    (404: not there either), so none is reported as silent."""
    status, _, body = call(cluster["a"].url + "/v1/deployments", "POST",
                           json.dumps({"model": "/nowhere/x.gguf"}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 404, body
    message = json.loads(body)["error"]["message"]
    assert "is not on this node nor on b, c:" in message, message
    there = write_gguf(tmp_path / "x.gguf", **{"general.architecture": "llama"})
    assert call(cluster["a"].url + f"/internal/v1/model-file?path={there}")[0] == 404


def test_internal_listener_needs_a_client_certificate(pki: Pki,
                                                      cluster: dict[str, NodeProcess]) -> None:
    url = internal_url(cluster["a"])
    host, port = url.removeprefix("https://").rsplit(":", 1)
    no_cert = client_context(None, None, pki.ca.cert)  # trusts the CA, presents nothing
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            socket.create_connection((host, int(port)), timeout=10) as raw, \
            no_cert.wrap_socket(raw) as tls:
        tls.sendall(b"GET /internal/v1/deployments HTTP/1.1\r\nHost: x\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed without an answer")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{host}:{port}/internal/v1/deployments", timeout=10)
    # With a certificate of the cluster it answers.
    ctx = client_context(_cert(pki, "a"), _key(pki, "a"), pki.ca.cert)
    with urllib.request.urlopen(url + "/internal/v1/deployments", context=ctx,
                                timeout=10) as resp:
        assert resp.status == 200


def _cert(pki: Pki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki.root / f"{name}.crt").read_bytes())


def _key(pki: Pki, name: str) -> Ed25519PrivateKey:
    return NodeIdentity.load_or_create(pki.root / name).private_key


def test_rogue_ca_node_never_joins(tmp_path: Path, cluster: dict[str, NodeProcess]) -> None:
    rogue_pki = Pki(tmp_path / "rogue", name="rogue")
    tables = [get_json(n.url + "/v1/deployments") for n in cluster.values()]
    rogue = start_signed(rogue_pki, "rogue", cluster["a"].gossip)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            for n in cluster.values():
                assert "rogue" not in members(n)
            time.sleep(0.2)
        assert alive(rogue) == {"rogue"}
        assert [get_json(n.url + "/v1/deployments") for n in cluster.values()] == tables
    finally:
        rogue.stop()


def test_self_signed_peer_is_refused(pki: Pki, cluster: dict[str, NodeProcess]) -> None:
    """A certificate that names this cluster but signs itself: the TLS handshake of a join
    fails, and forged datagrams at the gossip port change nothing."""
    key = Ed25519PrivateKey.generate()
    node_id = key_id(raw_public_key(key))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "selfie")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                f"meshnode://{pki.ca.cluster_id}/{node_id}")]), critical=False)
            .sign(key, None))
    ctx = client_context(cert, key, pki.ca.cert)
    host, port = cluster["a"].gossip.rsplit(":", 1)
    before = members(cluster["a"])
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(b"\0\0\0\1\x90")
        if not tls.recv(1024):
            raise ConnectionError("closed without an answer")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        for i in range(200):
            udp.sendto(bytes([1, 0]) + bytes(20) + i.to_bytes(4, "big") + bytes(40),
                       (host, int(port)))
    time.sleep(0.5)  # the datagrams are in flight: nothing to wait on but time
    assert members(cluster["a"]) == before


def test_revoked_node_is_evicted_and_cannot_rejoin(pki: Pki,
                                                   cluster: dict[str, NodeProcess]) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    c_id = next(m["node_id"] for m in get_json(a.url + "/v1/cluster/nodes")["data"]
                if m["name"] == "c")
    # A list of another CA, and garbage, are refused and change nothing.
    foreign = RevocationList.revoke(Pki(pki.root / "other", "other").ca, None, node_ids=[c_id])
    for body in (foreign.to_bytes(), b"garbage"):
        status, _, _ = call(a.url + "/v1/cluster/revocations", "POST", body,
                            {"Content-Type": "application/octet-stream"})
        assert status == 400
    assert alive(a) == {"a", "b", "c"}
    rl = RevocationList.revoke(pki.ca, None, node_ids=[c_id])
    status, _, body = call(a.url + "/v1/cluster/revocations", "POST", rl.to_bytes(),
                           {"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(body) == {"object": "revocation_list", "sequence": 1,
                                                  "adopted": True}
    for n in (a, b):
        wait_for(lambda n=n: "c" not in members(n), 15, f"{n.url} drops c")
    assert (Path(b.data_dir) / "revocation.bin").read_bytes() == rl.to_bytes()
    # c is cut off: it sees the others die, and once restarted it cannot get back in.
    wait_for(lambda: alive(c) == {"c"}, 30, "c sees itself alone")
    c.stop()
    cluster["c"] = c = start_signed(pki, "c", a.gossip)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert "c" not in members(a) and "c" not in members(b)
        assert alive(c) == {"c"}
        time.sleep(0.2)


def _start_fails(args: list[str], tmp: Path, timeout_s: float = 60) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode", "start", "--http-port", "0", "--gossip-port", "0",
         "--data-dir", str(tmp / "data"), *args],
        capture_output=True, timeout=timeout_s, check=False, env={**os.environ, **ENV})
    assert proc.returncode != 0
    assert b"listening on" not in proc.stdout
    return proc.stderr.decode()


def test_expired_certificate_is_refused_at_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    _, cert, _ = pki.node("data", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    err = _start_fails(["--ca", str(pki.ca_pem), "--cert", str(cert)], tmp_path)
    assert "expired" in err and "meshnode cert renew" in err


def test_certificate_of_another_key_is_refused_at_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    _, cert, node_id = pki.node("other")
    err = _start_fails(["--ca", str(pki.ca_pem), "--cert", str(cert)], tmp_path)
    assert f"is for node {node_id}" in err and "meshnode cert issue" in err


def test_open_node_off_loopback_refuses_to_start(tmp_path: Path) -> None:
    err = _start_fails(["--host", "0.0.0.0", "--no-mdns"], tmp_path)
    assert "--insecure" in err and "--ca" in err
