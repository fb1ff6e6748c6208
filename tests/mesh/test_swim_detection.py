"""How fast a crash is declared dead, and what keeps that fast: the last-chance probe runs
during the final probe period of the suspicion timeout (not after it), and ping-req relays
nack early enough that a healthy prober's health score stays 0 while it probes a dead member.
memberlist's model: about 1.6 probe periods to the first suspicion, then the minimum
suspicion timeout once k = suspicion_mult - 2 members confirmed it."""

from __future__ import annotations

from sim import Sim, sim_seed
from test_swim_core import Harness, peer

from meshnode.mesh import (
    MemberAlive,
    MemberDead,
    MemberState,
    MemberSuspected,
    MeshConfig,
)
from meshnode.mesh.config import suspicion_timeout
from meshnode.mesh.probe import nack_after
from meshnode.mesh.wire import Ack, Addr, Nack, Ping, PingReq, Suspect

X, X_ADDR = peer(0)  # the suspect
STEP = 0.01


def answer_all_but(h: Harness, silent: Addr) -> list[tuple[float, Ping]]:
    """Play the healthy peers: ack every ping except those to ``silent``, nack every
    ping-req (the relay could not reach it). Returns the pings sent to ``silent``."""
    to_silent = []
    for addr, m in h.pop_sent():
        if isinstance(m, Ping) and addr == silent:
            to_silent.append((h.now, m))
        elif isinstance(m, Ping):
            h.recv(Ack(m.seq, 1), src=addr)
        elif isinstance(m, PingReq):
            h.recv(Nack(m.seq), src=addr)
    return to_silent


def suspect_x_with_full_confirmation(h: Harness) -> float:
    """peer1 accuses X and peer2, peer3 confirm: k = 2 of 6 members, so the timeout is the
    minimum, 4 s. Returns when the suspicion started."""
    h.run_to(0.1)
    h.recv(Suspect(1, X, "peer1"))
    h.recv(Suspect(1, X, "peer2"), Suspect(1, X, "peer3"))
    assert h.swim.member(X).state == MemberState.SUSPECT  # type: ignore[union-attr]
    return h.now


def test_relay_nacks_within_the_origins_probe_period_and_still_forwards_a_late_ack() -> None:
    cfg = MeshConfig.lan()
    assert nack_after(cfg) == 0.8 * 0.5
    # ping-req leaves at probe_timeout_s; the nack must be back before probe_interval_s.
    assert cfg.probe_timeout_s + nack_after(cfg) < cfg.probe_interval_s
    h = Harness(peers=3)
    origin, target = peer(1)[1], peer(2)[1]
    h.recv(PingReq(7, "peer2", target, True), src=origin)
    (_, ping), = [(a, m) for a, m in h.pop_sent() if isinstance(m, Ping)]
    h.run_to(nack_after(cfg) - STEP)
    assert (origin, Nack(7)) not in h.pop_sent()
    h.run_to(nack_after(cfg))
    assert (origin, Nack(7)) in h.pop_sent()
    h.run_to(0.45)  # after the nack, before the relay's probe timeout: still forwarded
    h.recv(Ack(ping.seq, 1), src=target)
    assert (origin, Ack(7, 1, b"", 0)) in h.pop_sent()


def test_dead_is_declared_at_the_suspicion_deadline_not_a_probe_period_later() -> None:
    h = Harness(peers=5)
    start = suspect_x_with_full_confirmation(h)
    deadline = start + suspicion_timeout(4, 6, 1.0)
    checks, dead_at = [], None
    while dead_at is None and h.now < deadline + 3:
        h.run_to(h.now + STEP)
        checks += answer_all_but(h, X_ADDR)
        if any(isinstance(e, MemberDead) for e in h.events):
            dead_at = h.now
    assert dead_at is not None and abs(dead_at - deadline) <= 2 * STEP
    # The last-chance probe went out one probe period before the deadline.
    assert any(abs(t - (deadline - 1.0)) <= 2 * STEP for t, _ in checks), checks
    assert h.swim.health_score == 0


def test_last_chance_probe_acked_clears_the_suspicion() -> None:
    h = Harness(peers=5)
    start = suspect_x_with_full_confirmation(h)
    deadline = start + suspicion_timeout(4, 6, 1.0)
    while h.now < deadline - 1.0 - STEP:  # X unreachable until just before the check
        h.run_to(h.now + STEP)
        answer_all_but(h, X_ADDR)
    while h.now < deadline + 3:  # X is back and answers (at the same incarnation)
        h.run_to(h.now + STEP)
        for _, ping in answer_all_but(h, X_ADDR):
            h.recv(Ack(ping.seq, 1), src=X_ADDR)
    assert not [e for e in h.events if isinstance(e, MemberDead)]
    assert h.swim.member(X).state == MemberState.ALIVE  # type: ignore[union-attr]
    assert [e for e in h.events if isinstance(e, MemberAlive) and e.member.node_id == X]
    assert h.swim.stats["suspect.cleared_by_ack"] == 1


def test_cut_off_node_does_not_accuse_at_the_minimum_timeout() -> None:
    h = Harness(peers=5)
    start = suspect_x_with_full_confirmation(h)
    h.pop_sent()
    h.run_to(start + 4.0 + 0.5)  # nobody answers us: no acks, no nacks
    assert h.swim.health_score >= 3
    assert not [e for e in h.events if isinstance(e, MemberDead)]


def test_crash_detection_follows_the_memberlist_model() -> None:
    sim = Sim(sim_seed(21))
    nodes = sim.bootstrap(10)
    sim.run_for(5)
    victim = nodes[3]
    sim.crash(victim)
    crashed_at = sim.now
    took = sim.run_until_true(
        lambda: sim.fraction_seeing(victim.node_id, {MemberState.DEAD}) == 1.0,
        timeout_s=60, step_s=0.01)
    assert took is not None
    suspected = min(t for n in nodes for t, e in n.events
                    if isinstance(e, MemberSuspected) and e.member.node_id == victim.node_id)
    dead_all = crashed_at + took
    min_timeout = suspicion_timeout(4, 10, 1.0)
    print(f"first suspicion {suspected - crashed_at:.2f} s, dead everywhere {took:.2f} s")
    # Suspicion to dead everywhere: the minimum timeout plus gossip, no extra probe period.
    assert min_timeout <= dead_all - suspected <= min_timeout + 0.5
    # Probing a dead member whose relays nack in time is no sign of our own ill health.
    assert all(n.swim.health_score == 0 for n in sim.live())


def test_confirmation_after_a_recent_failed_check_kills_at_once() -> None:
    h = Harness(peers=20)
    h.run_to(0.1)
    h.recv(Suspect(1, X, "peer1"), Suspect(1, X, "peer2"))  # one confirmation of k = 2
    start = h.now
    # The first check is planned for the soonest possible deadline, the minimum timeout
    # (5.3 s for 21 members), although with one confirmation the deadline is 15 s away.
    while h.now < start + suspicion_timeout(4, 21, 1.0) + 0.3:
        h.run_to(h.now + STEP)
        answer_all_but(h, X_ADDR)
    assert h.swim.member(X).state == MemberState.SUSPECT  # type: ignore[union-attr]
    assert h.swim.stats["probe.fail"] == 0  # our own round-robin did not confirm it
    h.recv(Suspect(1, X, "peer3"))  # the second confirmation: the deadline is now past
    h.run_to(h.now)  # the timers due now, and no later ones
    dead = [e for e in h.events if isinstance(e, MemberDead)]
    assert dead and dead[0].member.state == MemberState.DEAD
