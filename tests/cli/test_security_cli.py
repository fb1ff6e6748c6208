"""`meshnode ca ...` and `meshnode cert ...` through the real command (subprocesses)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.mesh.certs import load_ca
from meshnode.mesh.certverify import load_certificate, verify_node_cert
from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.revocation import load_revocation

PASS = "correct horse battery staple"


def meshnode(*args: str, cwd: Path, passphrase: str | None = PASS,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MESHNODE_CA_PASSPHRASE", "MESHNODE_API_KEY")}
    if passphrase is not None:
        env["MESHNODE_CA_PASSPHRASE"] = passphrase
    return subprocess.run([sys.executable, "-m", "meshnode", *args], check=False,
                          capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120, input=stdin)


def rows(out: str) -> dict[str, str]:
    """FIELD VALUE table -> dict."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    return {line[:13].strip(): line[13:].strip() for line in lines[1:]}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    out = meshnode("ca", "init", "--name", "prod", "--dir", "ca", cwd=d)
    assert out.returncode == 0, out.stderr
    ca = load_ca(d / "ca", PASS.encode())
    assert f"cluster id   {ca.cluster_id}" in out.stdout
    assert f"fingerprint  {ca.fingerprint.hex()}" in out.stdout
    return d / "ca"


def test_ca_init_encrypts_and_refuses_bad_input(ca_dir: Path, tmp_path: Path) -> None:
    key = (ca_dir / "ca_key.pem").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY") and b"scrypt" in key
    assert stat.S_IMODE((ca_dir / "ca_key.pem").stat().st_mode) == 0o600
    # A short passphrase, a second CA in the same place, no passphrase source: refused, and
    # nothing is written.
    out = meshnode("ca", "init", "--dir", "short", cwd=tmp_path, passphrase="tooshort")
    assert out.returncode == 1 and "at least 12 characters" in out.stderr
    assert not (tmp_path / "short").exists()
    out = meshnode("ca", "init", "--dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "already holds a cluster CA" in out.stderr
    out = meshnode("ca", "init", "--dir", "nopass", cwd=tmp_path, passphrase=None, stdin="")
    assert out.returncode == 1 and "MESHNODE_CA_PASSPHRASE" in out.stderr
    (tmp_path / "pw").write_text(PASS + "\n")
    out = meshnode("ca", "init", "--dir", "fromfile", "--passphrase-file", "pw", cwd=tmp_path,
                   passphrase=None)
    assert out.returncode == 0, out.stderr
    assert load_ca(tmp_path / "fromfile", PASS.encode()).cluster_id in out.stdout
    out = meshnode("ca", "init", "--dir", "plain", "--no-passphrase", cwd=tmp_path,
                   passphrase=None)
    assert out.returncode == 0 and "NOT encrypted" in out.stdout


def test_ca_show(ca_dir: Path) -> None:
    out = meshnode("ca", "show", "--dir", str(ca_dir), cwd=ca_dir, passphrase=None)
    assert out.returncode == 0, out.stderr
    shown = rows(out.stdout)
    ca = load_ca(ca_dir, PASS.encode())
    assert shown["cluster id"] == ca.cluster_id and shown["fingerprint"] == ca.fingerprint.hex()
    assert shown["key"] == "encrypted"
    out = meshnode("ca", "show", "--dir", str(ca_dir / "none"), cwd=ca_dir)
    assert out.returncode == 1 and "no CA certificate" in out.stderr


def test_cert_issue_for_a_public_key_show_verify_renew(ca_dir: Path, tmp_path: Path) -> None:
    out = meshnode("cert", "pubkey", "--data-dir", "node", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "node.pub").write_text(out.stdout)
    node = NodeIdentity.load_or_create(tmp_path / "node")
    out = meshnode("cert", "issue", "--name", "gpu-1", "--roles", "gpu,edge", "--days", "30",
                   "--public-key", "node.pub", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ca = load_ca(ca_dir, PASS.encode())
    info = verify_node_cert((tmp_path / "gpu-1-cert.pem").read_bytes(), ca.cert)
    assert (info.node_id, info.name, info.roles) == (node.node_id, "gpu-1", ("edge", "gpu"))

    shown = rows(meshnode("cert", "show", "gpu-1-cert.pem", cwd=tmp_path).stdout)
    assert shown["node"] == f"meshnode://{ca.cluster_id}/{node.node_id}"
    assert shown["roles"] == "edge, gpu" and shown["serial"] == f"{info.serial:x}"
    out = meshnode("cert", "verify", "gpu-1-cert.pem", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 0 and "valid for node " + node.node_id in out.stdout

    out = meshnode("cert", "renew", "gpu-1-cert.pem", "--days", "60", "--ca-dir", str(ca_dir),
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    renewed = verify_node_cert((tmp_path / "gpu-1-cert.pem").read_bytes(), ca.cert)
    assert renewed.node_id == info.node_id and renewed.serial != info.serial
    assert renewed.not_after > info.not_after

    # Bad input: both or neither key source; a wrong passphrase; a file that is not a key.
    out = meshnode("cert", "issue", "--name", "x", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "exactly one of --public-key" in out.stderr
    out = meshnode("cert", "issue", "--name", "x", "--bundle", "b", "--ca-dir", str(ca_dir),
                   cwd=tmp_path, passphrase="wrong passphrase!")
    assert out.returncode == 1 and "wrong passphrase" in out.stderr and not (tmp_path / "b")\
        .exists()
    out = meshnode("cert", "issue", "--name", "x", "--public-key", "gpu-1-cert.pem",
                   "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "cert pubkey" in out.stderr


def test_cert_bundle_and_revoke(ca_dir: Path, tmp_path: Path) -> None:
    out = meshnode("cert", "issue", "--name", "edge", "--bundle", "bundle", "--ca-dir",
                   str(ca_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    bundle = tmp_path / "bundle"
    assert stat.S_IMODE((bundle / "node_key.pem").stat().st_mode) == 0o600
    ca = load_ca(ca_dir, PASS.encode())
    identity = NodeIdentity.load_or_create(bundle)  # the bundle is a ready data dir
    info = verify_node_cert((bundle / "cert.pem").read_bytes(), ca.cert)
    assert info.node_id == identity.node_id
    assert load_certificate((bundle / "ca_cert.pem").read_bytes()) == ca.cert

    before = load_revocation(ca_dir, ca.public_key)
    out = meshnode("cert", "revoke", "bundle/cert.pem", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rl = load_revocation(ca_dir, ca.public_key)
    assert rl is not None and info.node_id in rl.node_ids
    assert rl.sequence == (before.sequence if before else 0) + 1
    out = meshnode("cert", "verify", "bundle/cert.pem", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "revoked" in out.stderr
    out = meshnode("cert", "renew", "bundle/cert.pem", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "revoked" in out.stderr
    # A bad node id changes nothing.
    out = meshnode("cert", "revoke", "--node-id", "nope", "--ca-dir", str(ca_dir), cwd=tmp_path)
    assert out.returncode == 1 and "not a node id" in out.stderr
    assert load_revocation(ca_dir, ca.public_key).sequence == rl.sequence  # type: ignore[union-attr]
