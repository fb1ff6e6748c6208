"""The replicated deployment table: last-writer-wins merge, tombstones, digest."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import msgspec
import pytest

from meshnode.node import ConfigError
from meshnode.node.deployments import Deployment, DeploymentTable
from meshnode.node.sync import decode_entries, encode_entries


def dep(name: str, version: int, origin: str = "a", **kw: object) -> Deployment:
    base = Deployment.new(name=name, model="smollm2-135m-instruct", engine="llama.cpp",
                          replicas=1, chat_template=None, context_length=2048, origin=origin)
    return msgspec.structs.replace(base, version=version, **kw)


def test_merge_is_last_writer_wins_and_order_free() -> None:
    now = time.time_ns()
    writes = [dep("x", now), dep("x", now + 5, replicas=3), dep("x", now + 5, origin="b"),
              dep("y", now), dep("x", now + 9, deleted=True), dep("z", now + 1)]
    digests, tables = set(), []
    for order in itertools.permutations(writes):
        table = DeploymentTable()
        for d in order:
            table.merge(d)
        digests.add(table.digest())
        tables.append(table.entries())
    assert len(digests) == 1 and all(t == tables[0] for t in tables)
    final = DeploymentTable()
    for d in writes:
        final.merge(d)
    assert "x" not in final and final.get("x") is None and final.entry("x").deleted
    assert [d.name for d in final.all()] == ["y", "z"]


def test_tie_on_version_goes_to_the_larger_origin() -> None:
    table = DeploymentTable()
    assert table.merge(dep("x", 10, origin="b"))
    assert not table.merge(dep("x", 10, origin="a"))
    assert table.entry("x").origin == "b"


def test_relaunch_after_stop_wins_over_the_tombstone() -> None:
    table = DeploymentTable()
    d = Deployment.new(name="x", model="m", engine="llama.cpp", replicas=1, chat_template=None,
                       context_length=128, origin="a")
    table.put(d.tombstone("c"))
    assert "x" not in table
    table.merge(msgspec.structs.replace(d, version=table.entry("x").version + 1))
    assert "x" in table


def test_expired_tombstones_are_purged_and_not_merged_back() -> None:
    table = DeploymentTable(tombstone_ttl_s=1.0)
    old = dep("x", time.time_ns() - 2_000_000_000, deleted=True)
    table.put(old)
    table.put(dep("y", time.time_ns(), deleted=True))
    assert table.purge() == 1
    assert table.entry("x") is None and table.entry("y") is not None
    assert not table.merge(old)


def test_digest_changes_with_any_entry_and_wire_round_trip() -> None:
    table = DeploymentTable()
    empty = table.digest()
    table.put(dep("x", 1))
    one = table.digest()
    table.put(dep("x", 1, deleted=True))
    assert len({empty, one, table.digest()}) == 3 and len(one) == 16
    assert decode_entries(encode_entries(table)) == table.entries()


def test_table_saves_and_loads_with_tombstones(tmp_path: Path) -> None:
    table = DeploymentTable()
    keep = Deployment.new(name="keep", model="m", engine="llama.cpp", replicas=2,
                          chat_template=None, context_length=2048, origin="a")
    gone = Deployment.new(name="gone", model="m", engine="llama.cpp", replicas=1,
                          chat_template=None, context_length=2048, origin="a")
    table.put(keep)
    table.put(gone.tombstone("a"))
    path = tmp_path / "deployments.json"
    table.save(path)
    again = DeploymentTable()
    assert again.load(path) == 2
    assert again.entries() == table.entries() and again.digest() == table.digest()
    assert "gone" not in again and again.get("keep") == keep
    assert DeploymentTable().load(tmp_path / "missing.json") == 0


@pytest.mark.parametrize("content", [b"", b"{not json", b'[{"name": 1}]', b'{"a": 1}'])
def test_a_damaged_table_file_is_refused_and_changes_nothing(tmp_path: Path,
                                                            content: bytes) -> None:
    table = DeploymentTable()
    table.put(Deployment.new(name="x", model="m", engine="llama.cpp", replicas=1,
                             chat_template=None, context_length=2048, origin="a"))
    before = table.entries()
    path = tmp_path / "deployments.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="move it away"):
        table.load(path)
    assert table.entries() == before


def test_an_update_changes_only_the_fields_it_names_as_a_newer_version() -> None:
    from meshnode.engines import InvalidRequest, decode_request
    from meshnode.node import InvalidDeployment, UpdateRequest

    d = dep("x", time.time_ns() + 10**12, nodes=("c",), labels=("gpu",), min_ram_mb=100)
    moved = d.updated(decode_request(b'{"nodes": ["b", "a", "b"]}', UpdateRequest), "n2")
    assert moved.nodes == ("a", "b") and moved.labels == ("gpu",) and moved.min_ram_mb == 100
    assert moved.replicas == d.replicas and moved.model == d.model
    assert moved.version > d.version and moved.origin == "n2"  # a clock behind still wins
    cleared = moved.updated(UpdateRequest(labels=(), min_ram_mb=0, replicas=3), "n1")
    assert (cleared.nodes, cleared.labels, cleared.min_ram_mb, cleared.replicas) == (
        ("a", "b"), (), 0, 3)
    for bad in (b"{}", b'{"model": "other"}', b'{"replicas": 0}', b'{"nodes": ["a b"]}',
                b'{"labels": ["x y"]}', b'{"min_ram_mb": -1}', b'{"replicas": null}'):
        with pytest.raises((InvalidDeployment, InvalidRequest)):
            decode_request(bad, UpdateRequest)


def test_abilities_travel_with_the_entry_and_older_entries_decode_without_them() -> None:
    """A node without a model's file (given by path) learns what it serves from the entry;
    an entry written by an older node (no field) decodes with () and a newer field an older
    decoder does not know is skipped."""
    table = DeploymentTable()
    table.put(dep("x", 1, abilities=("embed", "rerank")))
    assert decode_entries(encode_entries(table))[0].abilities == ("embed", "rerank")
    older = msgspec.msgpack.encode([{k: v for k, v in msgspec.to_builtins(dep("y", 1)).items()
                                     if k != "abilities"}])
    assert decode_entries(older)[0].abilities == ()

    class Older(msgspec.Struct, kw_only=True):
        name: str
        model: str
    assert msgspec.msgpack.decode(encode_entries(table), type=list[Older])[0].name == "x"


def test_engine_args_travel_with_the_entry_and_restart_a_replica_that_has_others() -> None:
    """Engine arguments are part of what a replica runs (Deployment.shape): the same
    deployment with other arguments is a new replica; an older entry decodes with ()."""
    table = DeploymentTable()
    table.put(dep("x", 1, engine="vllm", engine_args=("--max-num-seqs", "8")))
    entry = decode_entries(encode_entries(table))[0]
    assert entry.engine_args == ("--max-num-seqs", "8")
    assert entry.shape != msgspec.structs.replace(entry, engine_args=()).shape
    assert entry.shape == msgspec.structs.replace(entry, replicas=3).shape
    older = msgspec.msgpack.encode([{k: v for k, v in msgspec.to_builtins(dep("y", 1)).items()
                                     if k != "engine_args"}])
    assert decode_entries(older)[0].engine_args == ()
