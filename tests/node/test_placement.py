"""Placement is a pure function of the membership view: every node computes the same holders."""

from __future__ import annotations

from meshnode.node.cluster import NodeMeta
from meshnode.node.deployments import Deployment
from meshnode.node.placement import can_unload, candidates, holders, unplaced_reason


def dep(name: str = "m", replicas: int = 1, engine: str = "llama.cpp") -> Deployment:
    return Deployment.new(name=name, model="smollm2-135m-instruct", engine=engine,
                          replicas=replicas, chat_template=None, context_length=2048,
                          origin="a")


def meta(name: str, engines: tuple[str, ...] = ("llama.cpp",), ram_mb: int = 8000,
         replicas: tuple[tuple[str, str], ...] = ()) -> NodeMeta:
    return NodeMeta(name=name, http_host="127.0.0.1", http_port=1, ram_mb=ram_mb,
                    engines=engines, replicas=replicas)


def test_candidates_need_the_engine_and_the_ram() -> None:
    members = {"a": meta("a"), "b": meta("b", engines=("vllm",)), "c": meta("c", ram_mb=100),
               "d": meta("d", ram_mb=0)}
    assert set(candidates(dep(), members, size_mb=98)) == {"a", "d"}  # d: RAM unknown
    assert candidates(dep(), members, size_mb=98)["d"] == 1.0
    assert set(candidates(dep(), members)) == {"a", "c", "d"}  # size unknown: no RAM check


def test_holders_are_the_same_whatever_the_order_of_the_view() -> None:
    members = {n: meta(n) for n in "abcdef"}
    reordered = dict(reversed(list(members.items())))
    for i in range(50):
        d = dep(f"model-{i}", replicas=2)
        assert holders(d, members) == holders(d, reordered)
        assert len(holders(d, members)) == 2


def test_a_dead_node_moves_only_its_own_deployments() -> None:
    members = {n: meta(n) for n in "abcde"}
    before = {i: holders(dep(f"m{i}"), members) for i in range(200)}
    del members["c"]
    after = {i: holders(dep(f"m{i}"), members) for i in range(200)}
    moved = {i for i in before if before[i] != after[i]}
    assert moved == {i for i in before if before[i] == ["c"]}
    assert moved  # c held some of the 200


def test_replicas_above_the_candidates_place_on_all_of_them() -> None:
    members = {"a": meta("a"), "b": meta("b")}
    assert sorted(holders(dep(replicas=5), members)) == ["a", "b"]


def test_deleted_deployment_has_no_holders() -> None:
    d = dep().tombstone("b")
    assert holders(d, {"a": meta("a")}) == []


def test_lone_node_holds_everything() -> None:
    assert holders(dep(), {"me": meta("me")}) == ["me"]


def test_unload_waits_for_every_new_holder_to_be_ready() -> None:
    members = {"a": meta("a", replicas=(("m", "starting"),)), "b": meta("b")}
    assert not can_unload("m", ["a"], members)
    members["a"] = meta("a", replicas=(("m", "ready"),))
    assert can_unload("m", ["a"], members)
    assert not can_unload("m", ["a", "b"], members)
    assert not can_unload("m", [], members)


def test_unplaced_reason_says_why() -> None:
    assert unplaced_reason(dep(), {"a": meta("a")}) == ""
    assert "llama.cpp engine" in unplaced_reason(dep(), {"a": meta("a", engines=("vllm",))})
    assert "RAM" in unplaced_reason(dep(), {"a": meta("a", ram_mb=50)}, size_mb=98)


def test_a_failed_replica_hands_the_deployment_to_the_next_node() -> None:
    members = {n: meta(n) for n in "abcd"}
    d = dep("m", replicas=2)
    first = holders(d, members)
    failed = {**members, first[0]: meta(first[0], replicas=(("m", "failed"),))}
    after = holders(d, failed)
    assert first[0] not in after and len(after) == 2
    assert first[1] in after  # the healthy holder stays put
    # Other deployments on the failed node are not affected.
    assert holders(dep("other"), failed) == holders(dep("other"), members)


def test_failed_everywhere_says_where_and_what_to_do() -> None:
    members = {n: meta(n, replicas=(("m", "failed"),)) for n in "ab"}
    assert holders(dep("m"), members) == []
    why = unplaced_reason(dep("m"), members)
    assert "failed to load on a, b" in why and "meshnode ps" in why
