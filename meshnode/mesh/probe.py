"""Failure detection: the SWIM probe cycle with Lifeguard, ping-req relays, and the
last-chance check of a suspect.

One probe period, T = probe_interval_s * (h + 1) with h the local health score:
    t0            ping the next member of the round-robin order; if it is already suspect,
                  the suspect message goes first in the same packet (Lifeguard's buddy
                  system: it learns of it and its refutation rides back on the ack)
    t0 + timeout  no ack: ask indirect_checks random alive members to ping it (ping-req);
                  each answers with the forwarded ack, or a nack after nack_after(config),
                  early enough to reach us before t0 + T; and ping it over TCP too (a lossy
                  UDP path alone does not make it suspect)
    an ack relayed by a ping-req helper (not from the target's address): the target is
                  alive but may be out of this node's direct reach; a MemberIndirect event
                  tells the application, which may check its own paths there
    t0 + T        no UDP ack: if the TCP ping was acked, done (h unchanged); else suspect it
                  and h += missing nacks (or 1 if none were expected)
    an ack        success, h -= 1; the next probe starts at t0 + probe_interval_s (as with
                  memberlist's ticker, only failing probes are stretched by h)

A suspicion times out (suspicion.py) at its deadline, stretched by h + 1 while this node is
unhealthy. The suspect gets one last probe, a full one (direct, indirect, TCP) carrying the
suspect message, launched one probe period before that deadline so that its verdict falls
due at the deadline itself: any ack clears the suspicion (first-hand evidence beats rumour);
if it fails, the member is declared dead at the deadline, as memberlist would, so the check
costs a real failure no detection time. A probe ack whose incarnation is above the suspected
one clears a suspicion too.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from .awareness import Awareness
from .config import MeshConfig
from .events import MemberIndirect
from .members import MemberTable, Node
from .state import Membership
from .suspicion import Suspicion
from .timers import Timers
from .wire import Ack, Addr, MemberState, Msg, Nack, Ping, PingReq, Suspect

__all__ = ["Prober", "nack_after"]

_MAX_RELAYS = 1024  # ping-req relays in flight; each lives probe_timeout_s, so this is ample
_SEQ_MOD = 1 << 32
_EPSILON_S = 1e-6  # a check planned to end at a deadline ends there up to float rounding


def nack_after(cfg: MeshConfig) -> float:
    """Seconds a ping-req relay waits for the target's ack before it nacks.

    A nack only counts if it reaches the origin before the origin's probe deadline, which
    comes probe_interval_s - probe_timeout_s (at least: longer while the origin's health score
    stretches it) after the ping-req was sent. Waiting a full probe_timeout_s, as memberlist
    does, makes the nack arrive just after that deadline with the default timings, so every
    failed probe of a really dead member looked like missing nacks and raised the origin's
    health score by indirect_checks. 80 % of the shorter of the two leaves the rest for the
    two network legs (after Lifeguard's intent and swift-cluster-membership's fix).
    """
    return 0.8 * min(cfg.probe_timeout_s, cfg.probe_interval_s - cfg.probe_timeout_s)


@dataclasses.dataclass(slots=True)
class _Probe:
    seq: int
    target: Node
    inc: int          # the target's incarnation when probed: a later refutation wins
    start: float
    # For a last-chance probe (outside the round-robin): the suspicion it checks.
    check: Suspicion | None = None
    indirect: bool = False  # ping-reqs (or the TCP ping) went out: the direct ping timed out
    acked: bool = False
    tcp_acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclasses.dataclass(slots=True)
class _Relay:
    origin: Addr
    origin_seq: int
    nack: bool  # the origin asked for a nack if the target does not answer in time


class Prober:
    def __init__(self, config: MeshConfig, table: MemberTable, state: Membership,
                 awareness: Awareness, timers: Timers, rng: random.Random, stats: Counter[str],
                 log: Any, send: Callable[[Addr, list[Msg]], None],
                 stream: Callable[[Addr, Msg], None]) -> None:
        self._cfg = config
        self._table = table
        self._state = state
        self._awareness = awareness
        self._timers = timers
        self._stats = stats
        self._log = log
        self._send = send
        self._stream = stream
        self._seq = rng.randrange(_SEQ_MOD)
        self._probe: _Probe | None = None  # the round-robin probe in progress
        self._probes: dict[int, _Probe] = {}  # by seq: that one and last-chance probes
        self._next_probe_at = float("inf")
        self._relays: dict[int, _Relay] = {}

    def start(self, first_probe_at: float) -> None:
        self._schedule_probe(first_probe_at)

    def on_timer(self, kind: str, arg: Any, now: float) -> None:
        match kind:
            case "probe":
                if arg == self._next_probe_at:  # else superseded by an earlier schedule
                    self._start_probe(now)
            case "probe_indirect":
                self._probe_indirect(arg)
            case "probe_deadline":
                self._probe_deadline(arg, now)
            case "relay_nack":
                self._relay_nack(arg)
            case "relay":
                self._relays.pop(arg, None)
            case "suspicion":
                self._suspicion_timer(arg[0], arg[1], now)

    # ---- answers -------------------------------------------------------------------------

    def on_ack(self, ack: Ack, now: float, src: Addr) -> None:
        probe = self._probes.get(ack.seq)
        if probe is not None:
            if not probe.acked:
                probe.acked = True
                if probe.indirect and src != probe.target.addr:
                    # Relayed: the target answered another member, not us (a late direct
                    # ack comes from the target's own address).
                    self._stats["probe.indirect"] += 1
                    self._state.events.append(MemberIndirect(probe.target.snapshot()))
                self._acked(probe, ack, now)
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            self._send(relay.origin, [Ack(relay.origin_seq, ack.inc, ack.load,
                                          ack.load_version)])
            return
        self._stats["ack.late"] += 1  # after its probe ended, or a stray

    def _acked(self, probe: _Probe, ack: Ack, now: float) -> None:
        target = probe.target
        self._state.update_load(target.node_id, ack.inc, ack.load, ack.load_version)
        if probe.check is not None:
            del self._probes[probe.seq]
            self._state.clear_suspicion(target.node_id, now)
            return
        self._awareness.apply(-1)
        self._stats["probe.ok"] += 1
        if ack.inc > probe.inc:  # it refuted a suspicion we may not have heard of
            self._state.clear_suspicion(target.node_id, now)
        self._schedule_probe(max(now, probe.start + self._cfg.probe_interval_s))

    def on_tcp_ack(self, ack: Ack, now: float) -> None:
        probe = self._probes.get(ack.seq)
        if probe is not None:
            probe.tcp_acked = True

    def on_nack(self, seq: int) -> None:
        probe = self._probes.get(seq)
        if probe is not None:
            probe.nacks += 1

    def on_ping_req(self, req: PingReq, now: float, src: Addr) -> None:
        if len(self._relays) >= _MAX_RELAYS:
            self._stats["drop.relay_full"] += 1
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(src, req.seq, req.nack)
        self._send(req.addr, [Ping(seq, req.target)])
        if req.nack:
            self._timers.at(now + nack_after(self._cfg), "relay_nack", seq)
        # An ack that comes after the nack is still forwarded, until the probe timeout.
        self._timers.at(now + self._cfg.probe_timeout_s, "relay", seq)

    # ---- the probe cycle -------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MOD
        return self._seq

    def _schedule_probe(self, when: float) -> None:
        if when < self._next_probe_at:
            self._next_probe_at = when
            self._timers.at(when, "probe", when)

    def _start_probe(self, now: float) -> None:
        cfg = self._cfg
        self._next_probe_at = float("inf")
        for node in self._table.reap(now, cfg.reap_after_s):
            self._state.suspicions.pop(node.node_id, None)
            self._log.debug("member.reap", node=node.node_id, state=node.state.name)
        period = self._awareness.scale(cfg.probe_interval_s)
        target = None if self._state.leaving else self._table.next_probe_target()
        if target is not None:
            self._probe = self._launch(target, now, period, check=None)
        self._schedule_probe(now + period)

    def _launch(self, target: Node, now: float, period: float, *,
                check: Suspicion | None) -> _Probe:
        probe = _Probe(self._next_seq(), target, target.inc, now, check)
        self._probes[probe.seq] = probe
        ping = Ping(probe.seq, target.node_id)
        if target.state == MemberState.SUSPECT:
            suspect = Suspect(target.inc, target.node_id, self._table.local.node_id)
            self._send(target.addr, [suspect, ping])
        else:
            self._send(target.addr, [ping])
        self._timers.at(now + self._cfg.probe_timeout_s, "probe_indirect", probe)
        self._timers.at(now + period, "probe_deadline", probe)  # before the next probe
        return probe

    def _probe_indirect(self, probe: _Probe) -> None:
        if self._probes.get(probe.seq) is not probe or probe.acked:
            return
        local, target = self._table.local, probe.target
        peers = self._table.random_nodes(
            self._cfg.indirect_checks,
            lambda n: n is local or n is target or n.state != MemberState.ALIVE)
        for peer in peers:
            self._send(peer.addr, [PingReq(probe.seq, target.node_id, target.addr, True)])
        probe.expected_nacks = len(peers)
        probe.indirect = True
        if self._cfg.tcp_fallback_probe:
            self._stream(target.addr, Ping(probe.seq, target.node_id))

    def _probe_deadline(self, probe: _Probe, now: float) -> None:
        if self._probes.get(probe.seq) is not probe:
            return
        del self._probes[probe.seq]
        if probe is self._probe:
            self._probe = None
        if probe.acked:
            return
        target = probe.target
        if probe.tcp_acked:
            # Reachable over TCP, not over UDP: a lossy or filtered path, not a failure; not
            # a sign of our own health either way.
            self._stats["probe.tcp_only"] += 1
            self._log.debug("probe.tcp_only", node=target.node_id)
            if probe.check is not None:
                self._state.clear_suspicion(target.node_id, now)
            return
        if probe.check is not None:
            # Only the suspicion it checked: a refutation and a newer suspicion since then
            # start a new timeout.
            susp = probe.check
            if self._state.suspicions.get(target.node_id) is susp:
                susp.checking = False
                susp.failed_check_at = now
                self._suspicion_timer(target.node_id, susp, now)
            return
        self._stats["probe.fail"] += 1
        # Lifeguard: relays that did not even nack suggest that *we* are the problem.
        if probe.expected_nacks > 0:
            self._awareness.apply(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._awareness.apply(1)
        local = self._table.local.node_id
        self._state.on_suspect(Suspect(probe.inc, target.node_id, local), now)

    def _relay_nack(self, seq: int) -> None:
        relay = self._relays.get(seq)
        if relay is not None:  # no ack yet (an ack removes the relay)
            self._send(relay.origin, [Nack(relay.origin_seq)])

    # ---- suspicion timeout -----------------------------------------------------------------

    def _suspicion_timer(self, node_id: str, susp: Suspicion, now: float) -> None:
        """Declare a suspect dead at its deadline if a last-chance probe failed within the
        last probe period; else plan that probe so that its verdict falls due at the
        deadline. The check runs during the last probe period of the timeout instead of
        after it, so it costs a real failure no detection time: dead is declared at the
        deadline, as memberlist would declare it.

        The deadline is unknown in advance (confirmations shorten it, at any time), so the
        first check is planned for the soonest possible deadline, the minimum timeout; if the
        deadline is later, another is planned for it. A confirmation that arrives after the
        minimum then finds a recent failed check and the member dies at once, as in
        memberlist, rather than one more probe period later.

        The timeout is stretched by the local health multiplier (h + 1): a node that misses
        its own acks and nacks (cut off, overloaded) is likely the one at fault, and waits
        for its health to come back before it accuses. A healthy node (h = 0, which it stays
        while probing a dead member whose relays nack in time) is not slowed at all.
        Timers of a suspicion may fire early or twice (confirmations and health changes move
        the deadline): each firing recomputes what is due."""
        node = self._table.get(node_id)
        if (self._state.suspicions.get(node_id) is not susp or node is None
                or node.state != MemberState.SUSPECT or susp.checking):
            return
        stretch = self._awareness.score + 1
        period = self._awareness.scale(self._cfg.probe_interval_s)
        due = susp.due(stretch)
        failed = susp.failed_check_at
        if failed is not None and now >= due - _EPSILON_S and now - failed <= period:
            self._state.declare_dead(node_id, now)
            return
        launch_at = (susp.earliest_due(stretch) if failed is None else due) - period
        if now < launch_at:
            self._timers.at(launch_at, "suspicion", (node_id, susp))
            return
        # A full probe period: it ends at the deadline, or later by at most one period if
        # the deadline was already close when the check became due (a late confirmation
        # after a stale check, or a health change).
        susp.checking = True
        self._launch(node, now, period, check=susp)
