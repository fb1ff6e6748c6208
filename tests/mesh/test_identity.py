"""Node identity: key file creation, permissions, corruption, id scheme."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.mesh.crypto_errors import FileCorruptError, FilePermissionError, SecurityError
from meshnode.mesh.identity import (
    KEY_FILE_NAME,
    NodeIdentity,
    is_key_id,
    key_id,
    raw_public_key,
    short_key_id,
)
from meshnode.mesh.securefile import create_private, read_private, replace_file


def test_created_once_then_loaded(tmp_path):
    data_dir = tmp_path / "data"
    first = NodeIdentity.load_or_create(data_dir)
    path = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    second = NodeIdentity.load_or_create(data_dir)
    assert second.node_id == first.node_id
    assert second.public_key_bytes == first.public_key_bytes == raw_public_key(first.private_key)
    assert len(first.public_key_bytes) == 32
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]  # no temp files left


def test_node_id_scheme():
    ident = NodeIdentity.generate()
    digest = hashlib.sha256(ident.public_key_bytes).digest()[:16]
    assert ident.node_id == base64.b32encode(digest).decode().rstrip("=").lower()
    assert len(ident.node_id) == 26 and is_key_id(ident.node_id)
    assert short_key_id(ident.node_id) == digest[:8]
    assert key_id(ident.public_key_bytes) == ident.node_id
    assert "private_key" not in repr(ident)
    assert not is_key_id(ident.node_id.upper())
    with pytest.raises(ValueError):
        short_key_id("not-an-id")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_key_readable_by_others_refused(tmp_path, mode):
    NodeIdentity.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, mode)
    with pytest.raises(FilePermissionError, match="chmod 600"):
        NodeIdentity.load_or_create(tmp_path)


def test_symlinked_key_refused(tmp_path):
    real = tmp_path / "elsewhere.pem"
    NodeIdentity.load_or_create(tmp_path / "a")
    os.rename(tmp_path / "a" / KEY_FILE_NAME, real)
    os.symlink(real, tmp_path / "a" / KEY_FILE_NAME)
    with pytest.raises(FilePermissionError):
        NodeIdentity.load_or_create(tmp_path / "a")


def test_directory_as_key_refused(tmp_path):
    (tmp_path / KEY_FILE_NAME).mkdir()
    with pytest.raises(SecurityError):
        NodeIdentity.load_or_create(tmp_path)


def _write_key(tmp_path, data: bytes) -> None:
    replace_file(tmp_path / KEY_FILE_NAME, data, 0o600)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
    ],
    ids=["empty", "garbage", "bad-base64-body", "ec-key", "encrypted"],
)
def test_corrupt_key_refused_and_kept(tmp_path, content):
    _write_key(tmp_path, content)
    with pytest.raises(FileCorruptError):
        NodeIdentity.load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == content  # never replaced silently


def test_truncated_key_refused(tmp_path):
    NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    _write_key(tmp_path, path.read_bytes()[:40])
    with pytest.raises(FileCorruptError):
        NodeIdentity.load_or_create(tmp_path)


def test_create_private_never_clobbers(tmp_path):
    path = tmp_path / "f"
    assert create_private(path, b"one")
    assert not create_private(path, b"two")
    assert read_private(path) == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_concurrent_first_start_agrees(tmp_path):
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(NodeIdentity.load_or_create(tmp_path).node_id)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=600)
    | st.binary(max_size=200).map(
        lambda b: (
            b"-----BEGIN PRIVATE KEY-----\n"
            + base64.encodebytes(b)
            + b"-----END PRIVATE KEY-----\n"
        )
    )
)
def test_fuzz_key_file(tmp_path, data):
    _write_key(tmp_path, data)
    try:
        ident = NodeIdentity.load_or_create(tmp_path)
    except FileCorruptError:
        return
    assert is_key_id(ident.node_id)  # only a real Ed25519 key may load
