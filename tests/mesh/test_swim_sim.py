"""Cluster behaviour on the simulated network: join, failure detection, refutation,
partitions, loss, flapping, leave, metadata. Deterministic from the printed seed."""

from __future__ import annotations

from sim import Sim, SimNode, sim_seed

from meshnode.mesh import (
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspected,
    MemberUpdated,
    MeshConfig,
)

ALIVE, SUSPECT, DEAD, LEFT = MemberState


def events_about(nodes: list[SimNode], node_id: str, kind: type) -> list[tuple[SimNode, float]]:
    return [(n, t) for n in nodes for t, e in n.events
            if isinstance(e, kind) and e.member.node_id == node_id]


def join_sequentially(sim: Sim, n: int, spacing_s: float = 0.05) -> list[SimNode]:
    """n nodes; each joins one random earlier node, spacing_s apart."""
    nodes = [sim.add_node()]
    for _ in range(n - 1):
        sim.run_for(spacing_s)
        nodes.append(sim.add_node(join=[sim.rng.choice(nodes)]))
    return nodes


def test_join_3() -> None:
    sim = Sim(sim_seed(3))
    a = sim.add_node()
    b = sim.add_node(join=[a])
    c = sim.add_node(join=[b])
    assert sim.run_until_true(sim.converged, timeout_s=5) is not None
    for node in (a, b, c):
        joined = {e.member.node_id for _, e in node.events if isinstance(e, MemberJoined)}
        assert joined == {a.node_id, b.node_id, c.node_id} - {node.node_id}


def test_join_50() -> None:
    sim = Sim(sim_seed(50))
    join_sequentially(sim, 50)
    took = sim.run_until_true(sim.converged, timeout_s=20)
    print(f"50 nodes converged {took} s after the last join")
    assert took is not None
    assert sim.max_packet <= 1400


def test_join_1000() -> None:
    sim = Sim(sim_seed(1000), record_events=False)
    nodes = sim.bootstrap(999)
    new = sim.add_node(join=[sim.rng.choice(nodes)])

    def everyone_knows() -> bool:
        return (len(new.swim.members()) == 1000
                and sim.fraction_seeing(new.node_id, {ALIVE}) == 1.0)

    took = sim.run_until_true(everyone_knows, timeout_s=10, step_s=0.2)
    print(f"join reached all 999 nodes in {took} s")
    assert took is not None and took < 5
    assert sim.max_packet <= 1400


def test_crash_is_detected_by_everyone_and_nobody_else_dies() -> None:
    sim = Sim(sim_seed(11))
    nodes = sim.bootstrap(20)
    sim.run_for(5)
    victim = nodes[7]
    sim.crash(victim)
    took = sim.run_until_true(
        lambda: sim.fraction_seeing(victim.node_id, {DEAD}) == 1.0, timeout_s=60)
    print(f"crash seen as dead by all in {took} s")
    # min suspicion = 4 * log10(20) * 1 s = 5.2 s; max = 6 * min = 31 s; plus probe rounds.
    assert took is not None and took < 35
    assert events_about(nodes, victim.node_id, MemberSuspected)
    assert len(events_about(nodes, victim.node_id, MemberDead)) == 19
    others = {n.node_id for n in nodes} - {victim.node_id}
    assert not [e for n in nodes for _, e in n.events
                if isinstance(e, MemberDead) and e.member.node_id in others]


def test_briefly_cut_off_node_refutes_its_suspicion() -> None:
    sim = Sim(sim_seed(12))
    nodes = sim.bootstrap(10)
    sim.run_for(3)
    x = nodes[3]
    sim.cut(x)
    assert sim.run_until_true(
        lambda: sim.fraction_seeing(x.node_id, {SUSPECT}) > 0, timeout_s=30) is not None
    sim.uncut(x)
    sim.run_for(60)
    assert not events_about(nodes, x.node_id, MemberDead)
    assert events_about(nodes, x.node_id, MemberAlive)  # refuted
    assert x.swim.local_member().incarnation > 1 and x.swim.stats["refute"] >= 1
    assert sim.converged()


def test_partition_into_halves_and_heal() -> None:
    sim = Sim(sim_seed(13))
    nodes = sim.bootstrap(20)
    left, right = nodes[:10], nodes[10:]
    sim.run_for(2)
    sim.partition(left, right)

    def split() -> bool:
        return all(a.view(b.node_id) == DEAD and b.view(a.node_id) == DEAD
                   for a in left for b in right)

    took = sim.run_until_true(split, timeout_s=90)
    print(f"each half saw the other dead after {took} s")
    assert took is not None
    assert sim.converged(left) and sim.converged(right)  # no false deaths within a half
    sim.run_for(20)
    sim.heal()
    took = sim.run_until_true(sim.converged, timeout_s=180)
    print(f"healed in {took} s")
    assert took is not None


def test_20_percent_loss_declares_no_live_node_dead() -> None:
    sim = Sim(sim_seed(14), loss=0.2)
    nodes = sim.bootstrap(30)
    sim.run_for(600)
    suspected = sum(isinstance(e, MemberSuspected) for n in nodes for _, e in n.events)
    print(f"600 s at 20% loss: {suspected} suspicions, all refuted")
    assert suspected > 0  # the loss did bite
    assert not [e for n in nodes for _, e in n.events if isinstance(e, MemberDead)]
    sim.loss = 0.0
    assert sim.run_until_true(sim.converged, timeout_s=30) is not None


def test_flapping_node_ends_alive_everywhere() -> None:
    sim = Sim(sim_seed(15))
    nodes = sim.bootstrap(10)
    x = nodes[4]
    for _ in range(5):
        sim.cut(x)
        sim.run_for(9)
        sim.uncut(x)
        sim.run_for(7)
    took = sim.run_until_true(sim.converged, timeout_s=120)
    print(f"converged {took} s after the flapping stopped")
    assert took is not None
    assert x.swim.local_member().incarnation > 1
    assert events_about(nodes, x.node_id, MemberSuspected)
    # While cut off, x itself may declare others dead (it hears nobody); the connected
    # nodes never wrongly declare one of themselves dead.
    others = [n for n in nodes if n is not x]
    assert not [e for n in others for _, e in n.events
                if isinstance(e, MemberDead) and e.member.node_id != x.node_id]


def test_restarted_node_refutes_its_death() -> None:
    sim = Sim(sim_seed(16))
    nodes = sim.bootstrap(8)
    x = nodes[2]
    sim.crash(x)
    assert sim.run_until_true(
        lambda: sim.fraction_seeing(x.node_id, {DEAD}) == 1.0, timeout_s=60) is not None
    reborn = sim.restart(x, join=[nodes[0]])
    assert sim.run_until_true(sim.converged, timeout_s=30) is not None
    assert reborn.swim.local_member().incarnation > 1
    assert any(e.recovered for n in nodes for _, e in n.events if isinstance(e, MemberAlive))


def test_graceful_leave_is_seen_as_left_quickly() -> None:
    sim = Sim(sim_seed(17))
    nodes = sim.bootstrap(20)
    sim.run_for(3)
    x = nodes[5]
    sim._apply(x, x.swim.leave(sim.now))
    took = sim.run_until_true(
        lambda: sim.fraction_seeing(x.node_id, {LEFT}) == 1.0, timeout_s=10, step_s=0.05)
    print(f"leave seen by all in {took} s")
    assert took is not None and took < 2
    assert sim.run_until_true(lambda: x.swim.leave_done, timeout_s=10) is not None
    sim.crash(x)  # the process exits after leaving
    sim.run_for(60)
    assert sim.fraction_seeing(x.node_id, {LEFT}) == 1.0
    assert len(events_about(nodes, x.node_id, MemberLeft)) == 19
    assert not events_about(nodes, x.node_id, MemberDead)


def test_meta_update_propagates() -> None:
    sim = Sim(sim_seed(18))
    nodes = sim.bootstrap(50)
    sim.run_for(2)
    x = nodes[9]
    x.delegate.meta = b'{"gpus": 2}'
    sim._apply(x, x.swim.update_meta(sim.now))

    def everyone_has_it() -> bool:
        return all(n.swim.member(x.node_id).meta == b'{"gpus": 2}'  # type: ignore[union-attr]
                   for n in nodes)

    took = sim.run_until_true(everyone_has_it, timeout_s=10, step_s=0.05)
    print(f"meta reached all in {took} s")
    assert took is not None and took < 3
    assert len(events_about(nodes, x.node_id, MemberUpdated)) == 49


def test_load_spreads_without_raising_incarnation() -> None:
    sim = Sim(sim_seed(19), MeshConfig.lan(push_pull_interval_s=5))
    nodes = sim.bootstrap(6)
    x = nodes[0]
    x.delegate.load = b"q=7"
    took = sim.run_until_true(
        lambda: all(n.swim.member(x.node_id).load == b"q=7"  # type: ignore[union-attr]
                    for n in nodes[1:]), timeout_s=30)
    assert took is not None
    assert x.swim.local_member().incarnation == 1


def test_same_seed_same_run() -> None:
    def run(seed: int) -> tuple[object, ...]:
        sim = Sim(seed, loss=0.05)
        nodes = join_sequentially(sim, 12)
        sim.run_for(5)
        sim.crash(nodes[3])
        sim.run_for(30)
        trace = [(n.index, round(t, 9), type(e).__name__, e.member.node_id)
                 for n in nodes for t, e in n.events]
        return tuple(trace), tuple(sorted(sim.bytes_sent.items()))

    assert run(sim_seed(20)) == run(sim_seed(20))
