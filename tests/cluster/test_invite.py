"""Invites on real processes: a CA-holding signed node issues a token, a new machine joins with
`meshnode start --token`, the same token is then refused, and an expired one too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import NodeProcess, wait_for

from meshnode.mesh.certs import load_ca
from meshnode.mesh.certverify import verify_node_cert
from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.invite import parse_invite

pytestmark = pytest.mark.cluster
PASS = "correct horse battery staple"


def meshnode(*args: str, key: str | None = None, cwd: Path | None = None,
             timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHNODE_CA_PASSPHRASE": PASS}
    env.pop("MESHNODE_API_KEY", None)
    if key:
        env["MESHNODE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "meshnode", *args], check=False,
                          capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout_s)


def get(url: str, key: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:
        return 0, {}



@pytest.fixture
def holder(tmp_path: Path):
    """Node `a`: a signed node whose data dir holds the CA (so it serves redemption)."""
    a = tmp_path / "a"
    for args in (("ca", "init", "--name", "inv", "--dir", str(a / "ca")),
                 ("cert", "issue", "--name", "a", "--bundle", str(a), "--ca-dir", str(a / "ca")),
                 ("keys", "create", "--role", "admin", "--data-dir", str(a))):
        out = meshnode(*args)
        assert out.returncode == 0, out.stderr
    admin = out.stdout.splitlines()[1]
    node = NodeProcess(a, "--name", "a", "--ca", str(a / "ca_cert.pem"), "--cert",
                       str(a / "cert.pem"), "--internal-port", "0", "--invite-port", "0",
                       "--mesh-preset", "local", "--no-mdns",
                       env={"MESHNODE_CA_PASSPHRASE": PASS})
    try:
        yield node, admin
    finally:
        node.stop(signal.SIGKILL)


def test_invite_works_once_then_is_refused(holder, tmp_path: Path) -> None:
    a, admin = holder
    out = meshnode("invite", "--ttl", "10m", "--endpoint", a.url, key=admin)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("mni1_") and "meshnode start --token" in out.stderr
    # Without an admin key the node makes no invite.
    assert meshnode("invite", "--endpoint", a.url).returncode == 1

    b = NodeProcess(tmp_path / "b", "--name", "b", "--token", token, "--join", a.gossip,
                    "--internal-port", "0", "--mesh-preset", "local", "--no-mdns")
    try:
        ca = load_ca(tmp_path / "a" / "ca", PASS.encode())
        info = verify_node_cert((tmp_path / "b" / "cert.pem").read_bytes(), ca.cert)
        assert info.node_id == NodeIdentity.load_or_create(tmp_path / "b").node_id
        assert (tmp_path / "b" / "ca_cert.pem").read_bytes() == (tmp_path / "a" / "ca_cert.pem")\
            .read_bytes()

        # b is a member of a's signed cluster, and the admin key replicated to it.
        def joined() -> bool:
            status, body = get(a.url + "/v1/cluster/nodes", admin)
            return status == 200 and {m["name"]: m["state"] for m in body["data"]}.get("b") \
                == "alive"
        wait_for(joined, 30, "b joined a")
        wait_for(lambda: get(b.url + "/v1/models", admin)[0] == 200, 30, "key reached b")

        # The same token again, from another machine: refused, nothing started.
        again = meshnode("start", "--token", token, "--data-dir", str(tmp_path / "c"),
                         "--http-port", "0", "--gossip-port", "0", "--internal-port", "0",
                         "--no-mdns", timeout_s=60)
        assert again.returncode == 1
        assert "already used" in again.stderr and "meshnode invite" in again.stderr
        assert not (tmp_path / "c" / "cert.pem").exists()

        # `meshnode cert revoke FILE --endpoint` signs the next list, keeps it next to the CA,
        # and posts it to a running node: b is dropped from a's membership.
        out = meshnode("cert", "revoke", str(tmp_path / "b" / "cert.pem"), "--ca-dir",
                       str(tmp_path / "a" / "ca"), "--endpoint", a.url, key=admin)
        assert out.returncode == 0, out.stderr
        assert "sequence 1" in out.stdout and (tmp_path / "a" / "ca" / "revocation.bin").exists()

        def dropped() -> bool:
            status, body = get(a.url + "/v1/cluster/nodes", admin)
            return status == 200 and "b" not in {m["name"] for m in body["data"]}
        wait_for(dropped, 30, "a drops the revoked b")
    finally:
        b.stop(signal.SIGKILL)


def test_expired_invite_is_refused(holder, tmp_path: Path) -> None:
    a, admin = holder
    out = meshnode("invite", "--ttl", "1s", "--endpoint", a.url, key=admin)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    expires_at = parse_invite(token).expires_at
    wait_for(lambda: time.time() > expires_at, 5, "token expired")
    late = meshnode("start", "--token", token, "--data-dir", str(tmp_path / "late"),
                    "--http-port", "0", "--gossip-port", "0", "--no-mdns")
    assert late.returncode == 1 and "expired" in late.stderr
    assert not (tmp_path / "late" / "cert.pem").exists()
    # A damaged token is refused before anything is sent.
    bad = meshnode("start", "--token", token[:-8], "--data-dir", str(tmp_path / "bad"),
                   "--http-port", "0", "--gossip-port", "0", "--no-mdns")
    assert bad.returncode == 1 and "damaged" in bad.stderr
