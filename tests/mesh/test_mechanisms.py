"""The single-purpose mechanisms: Lifeguard suspicion and awareness, the broadcast queue."""

from __future__ import annotations

import math

import pytest

from meshnode.mesh.awareness import Awareness
from meshnode.mesh.broadcast import BroadcastQueue
from meshnode.mesh.suspicion import Suspicion, suspicion_remaining
from meshnode.mesh.wire import Alive, Dead, Suspect, encode_msg


def test_suspicion_starts_at_max_and_shrinks_with_confirmations() -> None:
    s = Suspicion("accuser", k=3, min_s=2.0, max_s=12.0, start=100.0)
    assert s.deadline == 112.0
    assert not s.confirm("accuser")  # the accuser is not a confirmation
    deadlines = [s.deadline]
    for peer in ("a", "b", "c"):
        assert s.confirm(peer)
        deadlines.append(s.deadline)
    assert deadlines == sorted(deadlines, reverse=True)
    # timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))
    assert deadlines[1] == pytest.approx(100 + 12 - 10 * math.log(2) / math.log(4))
    assert s.deadline == pytest.approx(102.0)  # k confirmations: the minimum
    assert not s.confirm("a") and not s.confirm("d")  # duplicate; beyond k
    assert s.confirmations == 3


def test_suspicion_without_possible_confirmers_uses_min() -> None:
    assert Suspicion("x", k=0, min_s=3.0, max_s=18.0, start=0.0).deadline == 3.0
    assert suspicion_remaining(5, 2, 3.0, 18.0) == 3.0


def test_awareness_clamps_and_scales() -> None:
    a = Awareness(8)
    a.apply(-3)
    assert a.score == 0 and a.scale(1.0) == 1.0
    a.apply(5)
    assert a.scale(0.5) == 3.0
    a.apply(100)
    assert a.score == 7 and a.scale(1.0) == 8.0


def test_broadcast_retransmit_limit() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("n1", Dead(1, "n1", "n2"))
    sent = 0
    while q.get(1400, n=50, max_count=255):  # limit = 4 * ceil(log10 51) = 8
        sent += 1
    assert sent == 8 and len(q) == 0


def test_broadcast_order_fewest_transmits_then_newest() -> None:
    q = BroadcastQueue(retransmit_mult=10)
    q.queue("a", Suspect(1, "a", "x"))
    assert q.get(1400, 5, 255) == [Suspect(1, "a", "x")]  # "a" now sent once
    q.queue("b", Suspect(1, "b", "x"))
    q.queue("c", Suspect(1, "c", "x"))
    one = len(encode_msg(Suspect(1, "a", "x")))
    assert q.get(one, 5, 255) == [Suspect(1, "c", "x")]  # unsent, newest
    assert q.get(one, 5, 255) == [Suspect(1, "b", "x")]
    assert q.get(3 * one, 5, 255) == [Suspect(1, "c", "x"), Suspect(1, "b", "x"),
                                      Suspect(1, "a", "x")]


def test_broadcast_newer_update_replaces_older() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("n", Suspect(3, "n", "x"))
    q.queue("n", Alive(4, "n", "name", ("h", 1)))
    assert len(q) == 1
    assert q.get(1400, 5, 255) == [Alive(4, "n", "name", ("h", 1))]


def test_broadcast_respects_budget_and_count() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for i in range(100):
        q.queue(f"n{i}", Dead(i, f"n{i}", "src"))
    size = len(encode_msg(Dead(50, "n50", "src")))
    msgs = q.get(10 * size, 100, 255)
    assert sum(len(encode_msg(m)) for m in msgs) <= 10 * size
    assert len(q.get(1400, 100, 3)) == 3
    assert q.get(4, 100, 255) == []
