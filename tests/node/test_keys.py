"""API key table: format, hashing, authentication, LWW/tombstone merge, the file in the data dir."""

from __future__ import annotations

import itertools
import os
import stat
import time

import msgspec
import pytest

from meshnode.mesh.crypto_errors import FilePermissionError
from meshnode.node import ApiKey, CreateKeyRequest, KeyStore, KeyTable, new_key
from meshnode.node.errors import InvalidDeployment
from meshnode.node.keys import KeyFileError, hash_secret, parse_key


def make(role: str = "user", **kw: object) -> tuple[str, ApiKey]:
    return new_key(CreateKeyRequest(role=role, **kw), origin="n0")  # type: ignore[arg-type]


def test_key_format_and_only_a_hash_is_kept() -> None:
    key, entry = make(name="ci")
    key_id, secret = parse_key(key)  # type: ignore[misc]
    assert key.startswith("mnk_") and key_id == entry.id and len(secret) == 43
    assert entry.secret_sha256 == hash_secret(secret) and secret not in msgspec.json.encode(
        entry).decode()
    assert make()[0] != make()[0]


def test_authenticate() -> None:
    table = KeyTable()
    key, entry = make(models=("m1",))
    table.merge(entry)
    assert table.authenticate(key) == entry
    assert table.authenticate(" " + key + "\n") == entry
    key_id, secret = parse_key(key)  # type: ignore[misc]
    wrong = f"mnk_{key_id}_{'A' * 43}" if secret != "A" * 43 else f"mnk_{key_id}_{'B' * 43}"
    for bad in ("", "Bearer x", key[:-1], wrong, f"mnk_{'0' * 12}_{secret}", key + "x"):
        assert table.authenticate(bad) is None, bad
    assert entry.allows_model("m1") and not entry.allows_model("m2")
    _, admin = make("admin")
    assert admin.allows_model("anything")


def test_expired_and_revoked_keys_fail() -> None:
    table = KeyTable()
    key, entry = make(expires_in_s=60)
    table.merge(entry)
    assert table.authenticate(key, now=entry.expires - 1) == entry
    assert table.authenticate(key, now=entry.expires) is None
    assert entry.state(entry.expires) == "expired"
    assert table.revoke(entry.id, "n1") is not None
    assert table.authenticate(key, now=entry.created) is None
    assert table.get(entry.id).state(entry.created) == "revoked"  # type: ignore[union-attr]
    assert table.revoke("000000000000", "n1") is None


def test_bad_requests_change_nothing() -> None:
    with pytest.raises(InvalidDeployment):
        make("admin", models=("m",))
    with pytest.raises(InvalidDeployment):
        make(name="bad\nname")
    with pytest.raises(InvalidDeployment, match="names no deployment"):
        make(models=())  # "none" by a slip must not become "all"
    assert make(models=None)[1].models == () and make()[1].models == ()  # left out: all
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"role": "root"}', type=CreateKeyRequest)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"role": "user", "expires_in_s": -1}', type=CreateKeyRequest)


def test_merge_is_order_independent_and_revocation_is_terminal() -> None:
    _, a = make(name="a")
    _, b = make(name="b")
    t = KeyTable()
    t.merge(a)
    revoked_a = t.revoke(a.id, "n1")
    assert revoked_a is not None
    # A later write that is not a revocation (a clock far ahead) cannot un-revoke.
    renamed_a = msgspec.structs.replace(a, name="a2", version=revoked_a.version + 10**12)
    writes = [a, b, revoked_a, renamed_a]
    digests = set()
    for order in itertools.permutations(writes):
        table = KeyTable()
        for w in order:
            table.merge(w)
        assert table.get(a.id).revoked  # type: ignore[union-attr]
        digests.add(table.digest())
        # Idempotent: merging everything again changes nothing.
        assert not any(table.merge(w) for w in writes)
    assert len(digests) == 1


def test_forgotten_only_long_after_expiry() -> None:
    table = KeyTable(tombstone_ttl_s=10)
    _, old = make(expires_in_s=1)
    old = msgspec.structs.replace(old, expires=int(time.time()) - 11)
    assert not table.merge(old)  # already past expiry + ttl: refused, cannot come back
    _, never = make()
    table.merge(never)
    table.revoke(never.id, "n0")
    assert table.purge() == 0 and len(table) == 1  # a revoked key without expiry is kept


def test_store_file_is_private_and_merges_concurrent_writers(tmp_path) -> None:
    node_table, cli_table = KeyTable(), KeyTable()
    node_store, cli_store = KeyStore(tmp_path, node_table), KeyStore(tmp_path, cli_table)
    node_store.load()
    key1, k1 = make(name="from-node")
    node_store.save([k1])
    key2, k2 = make(name="from-cli")
    cli_store.save([k2])  # another process: merges what the node wrote, adds its own
    path = tmp_path / "api_keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key1.split("_", 2)[2] not in text and key2.split("_", 2)[2] not in text
    assert node_store.reload_if_changed() == [k2.id]
    assert node_store.reload_if_changed() == []
    assert node_table.authenticate(key2) == k2 and cli_table.authenticate(key1) == k1


def test_damaged_or_unsafe_file_is_refused(tmp_path) -> None:
    path = tmp_path / "api_keys.json"
    path.write_text("{not json")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="move it away"):
        KeyStore(tmp_path, KeyTable()).load()
    path.write_text("[]")
    os.chmod(path, 0o644)
    with pytest.raises(FilePermissionError, match="chmod 600"):
        KeyStore(tmp_path, KeyTable()).load()
