"""Routing keys and choices: same prefix, same replica; bounded loads; same answer anywhere."""

from __future__ import annotations

import math
from collections import Counter

import msgspec

from meshnode.engines import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from meshnode.node.router import PREFIX_BYTES, Router, request_key


def chat(system: str | None, *turns: str, model: str = "m") -> ChatCompletionRequest:
    msgs = ([{"role": "system", "content": system}] if system else [])
    roles = ["user", "assistant"]
    msgs += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return msgspec.convert({"model": model, "messages": msgs}, ChatCompletionRequest)


def test_chat_key_is_model_system_and_first_user_message() -> None:
    base = request_key(chat("be brief", "hello"))
    assert request_key(chat("be brief", "hello", "hi!", "and then?")) == base  # later turns
    assert request_key(chat("be brief", "hello2")) != base
    assert request_key(chat("be long", "hello")) != base
    assert request_key(chat("be brief", "hello", model="other")) != base
    parts = msgspec.convert({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}]},
        ChatCompletionRequest)
    assert request_key(parts) != base  # content parts hash as their JSON


def test_chat_key_under_a_long_system_prompt_is_that_prompt() -> None:
    app = "You answer questions about our product. " * 10  # > PREFIX_BYTES
    assert len(app.encode()) > PREFIX_BYTES
    assert request_key(chat(app, "first user")) == request_key(chat(app, "another user"))
    assert request_key(chat(app, "q")) != request_key(chat("x" + app, "q"))
    assert request_key(chat(app, "q")) != request_key(chat(app, "q", model="other"))


def test_prompt_cache_key_makes_its_own_group_of_a_prefix() -> None:
    app = "You answer questions about our product. " * 10  # > PREFIX_BYTES

    def keyed(cache_key: str | None, question: str = "q") -> bytes:
        req = msgspec.structs.replace(chat(app, question), prompt_cache_key=cache_key)
        return request_key(req)

    assert keyed(None) == request_key(chat(app, "q"))  # no hint: the prefix alone
    assert keyed("user-1") == keyed("user-1", "another question")  # one group per key
    assert keyed("user-1") != keyed("user-2") != keyed(None)
    assert keyed("user-1") != request_key(
        msgspec.structs.replace(chat("x" + app, "q"), prompt_cache_key="user-1"))


def test_completion_key_is_the_first_bytes_of_the_prompt() -> None:
    def comp(prompt: object) -> bytes:
        return request_key(msgspec.convert({"model": "m", "prompt": prompt}, CompletionRequest))

    long = "x" * PREFIX_BYTES
    assert comp(long + "tail one") == comp(long + "tail two")
    assert comp("short a") != comp("short b")
    assert comp([1, 2, 3]) != comp([1, 2, 4])
    emb = msgspec.convert({"model": "m", "input": long + "a"}, EmbeddingRequest)
    assert request_key(emb) == b"m\0" + long.encode()


def test_same_key_same_choice_on_every_node_and_stable() -> None:
    nodes = {"n1": 0, "n2": 0, "n3": 0}
    first = Router().plan("dep", b"k", nodes)[0]
    assert sorted(first) == sorted(nodes)
    for _ in range(3):
        assert Router().plan("dep", b"k", dict(reversed(nodes.items())))[0] == first


def test_keys_spread_over_replicas() -> None:
    router = Router()
    nodes = {"n1": 0, "n2": 0}
    owners = Counter(router.plan("dep", f"prompt {i}".encode(), nodes)[0][0] for i in range(400))
    assert set(owners) == {"n1", "n2"} and min(owners.values()) > 120


def test_bounded_load_spills_a_hot_key() -> None:
    router = Router()
    nodes = {"n1": 0, "n2": 0}
    got: Counter[str] = Counter()
    tracks = []
    for _ in range(16):  # 16 concurrent requests with one prefix, counted as forwarded
        node = router.plan("dep", b"hot", nodes)[0][0]
        got[node] += 1
        tracks.append(router.track("dep", node))
        tracks[-1].__enter__()
    assert max(got.values()) <= math.ceil(1.25 * 16 / 2)
    for t in tracks:
        t.__exit__(None, None, None)
    assert not router.forwarded


def test_gossiped_load_and_own_count_are_not_added() -> None:
    router = Router()
    with router.track("dep", "n1"), router.track("dep", "n1"):
        # n1's gossip (2) already includes our two: the larger counts, not the sum, so the
        # total is 4 and the cap ceil(1.25 * 5 / 2) = 4 (with 6 it would be 5).
        assert router.plan("dep", b"k", {"n1": 2, "n2": 2})[1] == 4
        assert router.plan("dep", b"k", {"n1": 0, "n2": 2})[1] == 4
    assert router.plan("dep", b"k", {"n1": 2, "n2": 2})[1] == 4
    assert router.plan("dep", b"k", {"n1": 0, "n2": 0})[1] == 2  # the floor


def test_no_ready_replica_gives_no_order() -> None:
    assert Router().plan("dep", b"k", {})[0] == []


def test_a_gossiped_load_sets_the_cap_but_moves_no_prefix() -> None:
    """Only a replica knows its own count (a gossiped one may still count finished
    requests): the entering node sends the request to the prefix's owner with the cap, and
    the owner refuses if it is full (Node.serve)."""
    nodes = {"n1": 0, "n2": 0, "n3": 0}
    owner = Router().plan("dep", b"k", nodes, {})[0][0]
    busy = {**nodes, owner: 1}  # e.g. a gossiped snapshot taken while it served one
    assert Router().plan("dep", b"k", busy, {}) == Router().plan("dep", b"k", nodes, {})
    # The floor: without it the cap, ceil(1.25 * 2 / 3) = 1, would refuse a second request.
    assert Router().plan("dep", b"k", busy, {})[1] == 2
    assert Router(min_capacity=1).plan("dep", b"k", busy, {})[1] == 1
    order, cap, first_choice = Router().plan("dep", b"k", {**nodes, owner: 5}, {})
    assert order[0] == owner == first_choice and cap == 3  # max(ceil(1.25 * 6 / 3), 2)


def test_an_exact_local_count_at_the_cap_moves_the_request() -> None:
    nodes = {"n1": 0, "n2": 0, "n3": 0}
    owner = Router().plan("dep", b"k", nodes, {})[0][0]
    order, cap, _ = Router().plan("dep", b"k", {**nodes, owner: 1}, {}, local=owner)
    assert order[0] == owner and cap == 2
    plan = Router().plan("dep", b"k", {**nodes, owner: 2}, {}, local=owner)
    assert plan.order[0] != owner and plan.order[1:].count(owner) == 1 and plan.cap == 2
    assert plan.owner == owner  # so the replica it goes to instead is told it is a spill


def test_loads_count_per_deployment_so_another_deployment_moves_nothing() -> None:
    router = Router()
    nodes = {"n1": 0, "n2": 0, "n3": 0}
    owner = router.plan("dep", b"k", nodes)[0][0]
    with router.track("other", owner), router.track("other", owner), \
            router.track("other", owner):  # busy with another deployment's requests
        assert router.plan("dep", b"k", nodes)[0][0] == owner
    tracks = [router.track("dep", owner) for _ in range(3)]
    for t in tracks:
        t.__enter__()
    assert router.plan("dep", b"k", nodes)[0][0] != owner  # 3 > max(ceil(1.25 * 4 / 3), 2)
    for t in tracks:
        t.__exit__(None, None, None)
    assert not router.forwarded


def test_gossiped_load_is_read_per_replica_with_the_node_total_as_fallback() -> None:
    from meshnode.node.cluster import NodeLoad
    from meshnode.node.peers import replica_in_flight
    enc = msgspec.msgpack.encode
    new = enc(NodeLoad(in_flight=5, replicas=(("a", 4), ("b", 1))))
    assert [replica_in_flight(new, n) for n in ("a", "b", "c")] == [4, 1, 0]
    old = enc(NodeLoad(in_flight=5))  # a node that gossips no per-replica counts
    assert replica_in_flight(old, "a") == replica_in_flight(old, "c") == 5
    assert msgspec.msgpack.decode(old) == [5, None]
    assert replica_in_flight(enc([7]), "a") == 7  # the load of a node before the field
    assert replica_in_flight(b"\xc1junk", "a") == replica_in_flight(b"", "a") == 0


def test_a_node_gossips_per_replica_loads_while_they_fit_and_else_its_total() -> None:
    from meshnode.mesh import MeshConfig
    from meshnode.node.cluster import NodeLoad, node_load
    assert node_load([("a", 2), ("idle", 0), ("b", 1)]) == NodeLoad(3, (("a", 2), ("b", 1)))
    many = [(f"deployment-with-a-long-name-{i}", 1) for i in range(20)]
    load = node_load(many)  # 20 names do not fit the load's bytes: the total alone
    assert load == NodeLoad(20) and load.replicas is None
    assert len(msgspec.msgpack.encode(node_load(many[:3]))) <= MeshConfig().load_max_bytes


def test_one_replica_takes_every_request_with_the_ring_formula_for_its_cap() -> None:
    """The one-replica shortcut (no ring, no prefix id, no assignment) plans what the ring
    would: that replica, as owner, with capacity max(ceil(1.25 (total + 1)), floor)."""
    from meshnode.mesh.hashing import Ring

    router = Router()
    for load, forwarded, local in ((0, 0, None), (3, 0, None), (0, 5, None), (4, 9, "n1")):
        router.forwarded.clear()
        for _ in range(forwarded):
            router.sent("dep", "n1")
        total = load if local else max(load, forwarded)
        plan = router.plan("dep", b"k", {"n1": load}, {} if load % 2 else None, local)
        assert plan.order == ["n1"] and plan.owner == "n1"
        assert plan.cap == Ring(["n1"]).capacity(total, 1.25, 2)


def test_a_plan_reuses_the_assignment_only_for_the_same_read_only_ledgers() -> None:
    """An entry node routes from its peers' gossiped view, a read-only mapping reused for
    HOLDERS_TTL_S (peers.Routing): the assignment computed from it is reused as long as it is
    the same object. A plain dict is compared by content, so one changed in place is seen."""
    from types import MappingProxyType

    from meshnode.node.prefixes import pid_bytes, prefix_id

    router = Router()
    key = b"m\0" + b"a system prompt"
    pid = prefix_id(key)
    loads = {"a": 0, "b": 0}
    view = MappingProxyType({"a": b"", "b": pid_bytes(pid)})
    first = router.plan("m", key, loads, view)
    assert first.owner == "b"  # the replica that advertises the prefix
    assert router.plan("m", key, loads, view) == first
    assigned = router._assigned["m"][3]
    router.plan("m", key, loads, view)
    assert router._assigned["m"][3] is assigned  # reused, not recomputed
    plain = {"a": b"", "b": pid_bytes(pid)}
    assert router.plan("m", key, loads, plain).owner == "b"
    plain["a"], plain["b"] = pid_bytes(pid), b""  # the prefix moved, in the same dict
    assert router.plan("m", key, loads, plain).owner == "a"
