"""Weighted rendezvous placement and the bounded-load ring (meshnode.mesh.hashing).

Every node must reach the same placement and routing with no shared state, so determinism is
tested across processes with different PYTHONHASHSEED and pinned by golden vectors. Statistical
checks run on fixed key sets (the hashes are deterministic, so each check is a fixed outcome);
the tolerances are derived from the distribution and stated next to each. The one pseudo-random
test prints its seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from meshnode.mesh.errors import MeshError
from meshnode.mesh.hashing import (
    DEFAULT_LOAD_FACTOR,
    DEFAULT_VNODES,
    EmptyRingError,
    Ring,
    rendezvous_top,
)

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = {"alpha": 1.0, "beta": 2.0, "gamma": 0.5, "delta": 4.0}
SEED = 20240601


def keys(count: int, prefix: str = "key") -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


def node_ids(count: int) -> list[str]:
    return [f"node-{i:04d}" for i in range(count)]


def capacity(total_load: int, n: int, c: float) -> int:
    """The paper's bound, written out independently of the module under test."""
    return math.ceil(c * (total_load + 1) / n)


# --- determinism --------------------------------------------------------------------------------

# Changing any of these changes placement and routing on a mesh running mixed versions: treat a
# change here as a protocol change.
GOLDEN_HRW = {
    "": ["delta", "alpha", "gamma", "beta"],
    "model-a": ["delta", "beta", "alpha", "gamma"],
    "caf\u00e9": ["delta", "gamma", "beta", "alpha"],
}
GOLDEN_WALK = {
    "": ["delta", "gamma", "beta", "alpha"],
    "model-a": ["delta", "alpha", "beta", "gamma"],
    "caf\u00e9": ["gamma", "beta", "delta", "alpha"],
}


def test_golden_vectors() -> None:
    ring = Ring(WEIGHTS)
    for key, expected in GOLDEN_HRW.items():
        assert rendezvous_top(key, WEIGHTS, 4) == expected
    for key, expected in GOLDEN_WALK.items():
        assert list(ring.walk(key)) == expected
    assert rendezvous_top(b"\x00\xff", WEIGHTS, 4) == ["delta", "beta", "gamma", "alpha"]
    assert list(ring.walk(b"\x00\xff")) == ["gamma", "beta", "delta", "alpha"]
    # Owner full (5 + 1 > ceil(1.25 * 6 / 4) = 2): the next node in the walk takes it.
    assert ring.choose("model-a", {"delta": 5}) == "alpha"


_SNAPSHOT = """
import hashlib, json
from meshnode.mesh.hashing import Ring, rendezvous_top
weights = {f"node-{i}": 1.0 + i % 4 for i in range(12)}
ring = Ring(weights)
loads = {node: i % 5 for i, node in enumerate(weights)}
out = {
    "hrw": [rendezvous_top(f"k{i}", weights, 3) for i in range(300)],
    "walk": [list(ring.walk(f"k{i}")) for i in range(300)],
    "choose": [ring.choose(f"k{i}", loads) for i in range(300)],
    "salted": hash("meshnode"),
}
print(json.dumps(out))
"""


def _snapshot(hash_seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_same_results_across_processes_with_different_hash_seeds() -> None:
    scope: dict[str, Any] = {}
    exec(_SNAPSHOT.replace("print(json.dumps(out))", ""), scope)  # the same code, in this process
    here = scope["out"]
    one, two = _snapshot("1"), _snapshot("2")
    assert one["salted"] != two["salted"]  # the children really had different str hashes
    for result in (one, two):
        for field in ("hrw", "walk", "choose"):
            assert result[field] == here[field]


def test_str_key_is_its_utf8_bytes() -> None:
    ring = Ring(node_ids(7))
    for key in ("prompt", "caf\u00e9", "\u6f22\u5b57", ""):
        assert rendezvous_top(key, WEIGHTS, 4) == rendezvous_top(key.encode(), WEIGHTS, 4)
        assert ring.lookup(key) == ring.lookup(key.encode())
    ring.lookup("\ud800")  # a lone surrogate (possible from JSON) hashes; it does not raise


# --- rendezvous ---------------------------------------------------------------------------------


def test_rendezvous_shares_follow_weights() -> None:
    # Binomial standard deviation at 100k keys is <= 0.0016; 0.006 is about 4 of them.
    wins = Counter(rendezvous_top(key, WEIGHTS, 1)[0] for key in keys(100_000))
    total = sum(WEIGHTS.values())
    for node, weight in WEIGHTS.items():
        assert wins[node] / 100_000 == pytest.approx(weight / total, abs=0.006)


def test_rendezvous_equal_weights_share_evenly() -> None:
    nodes = dict.fromkeys(node_ids(10), 1.0)
    wins = Counter(rendezvous_top(key, nodes, 1)[0] for key in keys(20_000))
    assert set(wins) == set(nodes)
    for count in wins.values():
        assert count / 20_000 == pytest.approx(0.1, abs=0.009)  # sd 0.0021


def test_rendezvous_join_moves_keys_only_to_the_new_node() -> None:
    before = dict.fromkeys(node_ids(9), 1.0)
    after = {**before, "joiner": 2.0}
    moved = 0
    for key in keys(10_000):
        old, new = rendezvous_top(key, before, 1)[0], rendezvous_top(key, after, 1)[0]
        if old != new:
            assert new == "joiner"
            moved += 1
    assert moved / 10_000 == pytest.approx(2.0 / 11.0, abs=0.015)  # sd 0.0039


def test_rendezvous_leave_moves_only_its_keys_spread_by_weight() -> None:
    before = {**dict.fromkeys(node_ids(6), 1.0), "node-0000": 3.0, "leaver": 2.0}
    after = {node: w for node, w in before.items() if node != "leaver"}
    inherited: Counter[str] = Counter()
    for key in keys(20_000):
        old, new = rendezvous_top(key, before, 1)[0], rendezvous_top(key, after, 1)[0]
        if old != new:
            assert old == "leaver"
            inherited[new] += 1
        else:
            assert old != "leaver"
    # The leaver's keys (about 2/10 of 20k) go to the rest in proportion to their weights.
    total = sum(inherited.values())
    assert total / 20_000 == pytest.approx(0.2, abs=0.015)  # sd 0.0028
    for node, weight in after.items():
        assert inherited[node] / total == pytest.approx(weight / 8.0, abs=0.05)  # sd <= 0.013


def test_rendezvous_order_of_others_is_unchanged_when_a_node_leaves() -> None:
    nodes = {node: 1.0 + i % 3 for i, node in enumerate(node_ids(12))}
    for key in keys(1_000):
        full = rendezvous_top(key, nodes, len(nodes))
        top3 = full[:3]
        for leaver in (full[0], full[5], full[-1]):
            rest = {node: w for node, w in nodes.items() if node != leaver}
            assert rendezvous_top(key, rest, len(rest)) == [n for n in full if n != leaver]
            if leaver not in top3:  # an unrelated node: the top-k is exactly the same
                assert rendezvous_top(key, rest, 3) == top3


def test_rendezvous_weight_change_keeps_order_of_the_others() -> None:
    nodes = dict.fromkeys(node_ids(8), 1.0)
    heavier = {**nodes, "node-0003": 5.0}
    for key in keys(1_000):
        old = [n for n in rendezvous_top(key, nodes, 8) if n != "node-0003"]
        new = [n for n in rendezvous_top(key, heavier, 8) if n != "node-0003"]
        assert old == new


def test_rendezvous_top_k_is_a_prefix_of_the_full_order() -> None:
    nodes = {node: 1.0 + i % 5 for i, node in enumerate(node_ids(20))}
    for key in keys(200):
        full = rendezvous_top(key, nodes, 20)
        for k in (1, 2, 3, 7, 19):
            assert rendezvous_top(key, nodes, k) == full[:k]


def test_rendezvous_k_beyond_n_returns_all_nodes_ordered() -> None:
    top = rendezvous_top("key", WEIGHTS, 10)
    assert sorted(top) == sorted(WEIGHTS)
    assert top == rendezvous_top("key", WEIGHTS, 4)


def test_rendezvous_edge_cases() -> None:
    assert rendezvous_top("key", {}, 3) == []
    assert rendezvous_top("key", WEIGHTS, 0) == []
    assert rendezvous_top("key", {"only": 0.001}, 1) == ["only"]
    with pytest.raises(ValueError, match="k must be"):
        rendezvous_top("key", WEIGHTS, -1)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight"):
            rendezvous_top("key", {"a": 1.0, "b": bad}, 1)


# --- ring ---------------------------------------------------------------------------------------


def test_ring_share_per_node_within_vnode_tolerance() -> None:
    # A node's share is a sum of `vnodes` arcs: relative sd ~ sqrt((n-1)/n) / sqrt(vnodes), 7.5% for
    # n = 10, vnodes = 160. Allow 4 sd (plus the key sampling's ~1%).
    n, count = 10, 100_000
    ring = Ring(node_ids(n))
    assert ring.vnodes == DEFAULT_VNODES == 160
    owners = Counter(ring.lookup(key) for key in keys(count))
    tolerance = 4 * math.sqrt((n - 1) / n) / math.sqrt(DEFAULT_VNODES) + 0.01
    assert set(owners) == set(ring.nodes)
    for share in owners.values():
        assert abs(share / count * n - 1) <= tolerance


def test_ring_join_and_leave_move_only_the_changed_nodes_keys() -> None:
    base = node_ids(10)
    small, big = Ring(base), Ring([*base, "joiner"])
    moved = 0
    for key in keys(30_000):
        old, new = small.lookup(key), big.lookup(key)
        if old != new:  # joining: the moved keys all go to the joiner
            assert new == "joiner"
            moved += 1
        # leaving is the same pair read the other way: only the joiner's keys move
        if new != "joiner":
            assert old == new
        # and the walk of the others keeps its order
        assert list(small.walk(key)) == [n for n in big.walk(key) if n != "joiner"]
    # The joiner's share is 1/11 within the vnode tolerance (rel. sd 1/sqrt(160), allow 4 sd).
    assert abs(moved / 30_000 * 11 - 1) <= 4 / math.sqrt(DEFAULT_VNODES)


def test_walk_yields_every_node_once_starting_at_the_owner() -> None:
    for n in (1, 2, 3, 50):
        ring = Ring(node_ids(n))
        for key in keys(200):
            walk = list(ring.walk(key))
            assert len(walk) == n
            assert set(walk) == set(ring.nodes)
            assert walk[0] == ring.lookup(key)


def test_choose_without_load_is_the_plain_owner() -> None:
    ring = Ring(node_ids(10))
    uniform = dict.fromkeys(ring.nodes, 7)
    for key in keys(2_000):
        owner = ring.lookup(key)
        assert ring.choose(key, {}) == owner
        assert ring.choose(key, uniform) == owner  # equal loads: the owner is never full
        assert ring.choose(key, {"not-in-ring": 10_000}) == owner  # unknown ids are ignored


def test_choose_same_key_fills_the_walk_in_order_within_the_bound() -> None:
    n = 10
    ring = Ring(node_ids(n))
    for c in (1.0, DEFAULT_LOAD_FACTOR, 2.0):
        loads = dict.fromkeys(ring.nodes, 0)
        walk = list(ring.walk("hot-prefix"))
        for _ in range(2_000):
            node = ring.choose("hot-prefix", loads, c)
            cap = capacity(sum(loads.values()), n, c)
            full = walk[: walk.index(node)]
            assert all(loads[other] + 1 > cap for other in full)  # first fit in walk order
            loads[node] += 1
            assert max(loads.values()) <= math.ceil(c * sum(loads.values()) / n)
        # One hot key spreads over the first ceil(n / c) nodes of its walk, each at the bound.
        assert sum(1 for load in loads.values() if load) == math.ceil(n / c)


def _zipf_keys(rng: random.Random, count: int, distinct: int = 1_000, s: float = 1.1) -> list[str]:
    population = keys(distinct, "prefix")
    return rng.choices(population, weights=[1 / (i + 1) ** s for i in range(distinct)], k=count)


@pytest.mark.parametrize("n", [3, 10, 40])
def test_choose_zipf_keys_never_exceed_the_bound(n: int) -> None:
    print(f"seed={SEED}")
    rng = random.Random(SEED + n)
    ring = Ring(node_ids(n))
    c = DEFAULT_LOAD_FACTOR
    loads = dict.fromkeys(ring.nodes, 0)
    for key in _zipf_keys(rng, 20_000):
        loads[ring.choose(key, loads, c)] += 1
        assert max(loads.values()) <= math.ceil(c * sum(loads.values()) / n)
    # Without the bound the hottest prefix alone (~14% of requests) would sit on one node.
    assert max(loads.values()) <= math.ceil(c * 20_000 / n)


@pytest.mark.parametrize("n", [3, 10])
def test_choose_with_departures_places_each_request_within_the_bound(n: int) -> None:
    print(f"seed={SEED}")
    rng = random.Random(SEED * 7 + n)
    ring = Ring(node_ids(n))
    c = DEFAULT_LOAD_FACTOR
    loads = dict.fromkeys(ring.nodes, 0)
    in_flight: list[str] = []
    for key in _zipf_keys(rng, 20_000):
        while in_flight and rng.random() < 0.5:  # requests finish in random order
            loads[in_flight.pop(rng.randrange(len(in_flight)))] -= 1
        cap = capacity(sum(loads.values()), n, c)
        node = ring.choose(key, loads, c)
        walk = list(ring.walk(key))
        assert loads[node] + 1 <= cap
        assert all(loads[other] + 1 > cap for other in walk[: walk.index(node)])
        loads[node] += 1
        in_flight.append(node)


def test_choose_rejects_bad_arguments() -> None:
    ring = Ring(node_ids(3))
    for c in (0.99, math.inf, math.nan):
        with pytest.raises(ValueError, match="c must be"):
            ring.choose("key", {}, c)
    with pytest.raises(ValueError, match="loads"):
        ring.choose("key", {"node-0001": -1})
    with pytest.raises(ValueError, match="below the sum"):
        ring.choose_in(ring.order("key"), {"node-0001": 3}, total=2)


def test_choose_in_with_a_larger_known_total() -> None:
    """Loads known only in part (a lower bound per node) with the total they sit in: the
    capacity comes from the total, and some node is always under it."""
    rng = random.Random(7)
    print("seed 7")
    ring = Ring(node_ids(4))
    for _ in range(500):
        known = {n: rng.randrange(6) for n in ring.nodes}
        total = sum(known.values()) + rng.randrange(20)
        order = ring.order(str(rng.random()))
        cap = ring.capacity(total, 1.25, 2)
        assert cap == max(math.ceil(1.25 * (total + 1) / 4), 2)
        chosen = ring.choose_in(order, known, 1.25, 2, total)
        assert known[chosen] + 1 <= cap
        assert all(known[n] + 1 > cap for n in order[:order.index(chosen)])


def test_empty_ring() -> None:
    ring = Ring([])
    assert len(ring) == 0 and not ring
    assert list(ring.walk("key")) == []
    with pytest.raises(EmptyRingError, match="no nodes"):
        ring.lookup("key")
    with pytest.raises(EmptyRingError):
        ring.choose("key", {})
    assert issubclass(EmptyRingError, MeshError) and issubclass(EmptyRingError, ValueError)


def test_ring_is_immutable_and_deduplicates() -> None:
    ring = Ring(["b", "a", "b", "c"], vnodes=8)
    assert ring.nodes == ("a", "b", "c") and len(ring) == 3 and "a" in ring
    assert repr(ring) == "Ring(nodes=3, vnodes=8)"
    with pytest.raises(AttributeError):
        ring._points = ()
    with pytest.raises(AttributeError):
        del ring._owners
    with pytest.raises(ValueError, match="vnodes"):
        Ring(["a"], vnodes=0)


def test_ring_points_do_not_depend_on_input_order_or_other_vnode_counts() -> None:
    nodes = node_ids(20)
    a, b = Ring(nodes), Ring(reversed(nodes))
    for key in keys(500):
        assert list(a.walk(key)) == list(b.walk(key))
    # vnodes = 9 spans two 64-byte digests: exercises the word slicing.
    odd = Ring(nodes, vnodes=9)
    assert set(Counter(odd.lookup(key) for key in keys(2_000))) == set(nodes)
