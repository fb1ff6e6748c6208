"""MeshConfig: every knob of the membership protocol, in one frozen object.

Defaults are HashiCorp memberlist's ``DefaultLANConfig``. Durations are float seconds (``*_s``),
sizes are bytes. ``MeshConfig.lan()`` is the default; ``MeshConfig.local()`` trades bandwidth and
false-positive safety for speed, for tests on loopback (like memberlist's ``DefaultLocalConfig``).
Derive variants with ``dataclasses.replace(cfg, field=value)`` or ``MeshConfig.lan(field=value)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

from .errors import ConfigError
from .wire import (
    LOAD_MAX_BYTES,
    META_MAX_BYTES,
    UDP_MAX_BYTES,
    UDP_MIN_BYTES,
    largest_alive_packet,
)

__all__ = ["MeshConfig", "push_pull_scale", "retransmit_limit", "suspicion_timeout"]

# memberlist scales the push-pull interval only above this many members.
PUSH_PULL_SCALE_THRESHOLD = 32


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    # --- failure detection -------------------------------------------------------------------
    probe_interval_s: float = 1.0
    """Time between two probes of one member (round-robin over a shuffled list). Lower detects
    failures sooner and costs more packets: each probe is one ping and one ack (more on failure).
    Lifeguard stretches it by the awareness multiplier when this node itself looks unhealthy."""

    probe_timeout_s: float = 0.5
    """How long to wait for the direct ack before asking ``indirect_checks`` peers to ping-req.
    Should be near the 99th percentile RTT; must be below ``probe_interval_s``. Too low causes
    needless indirect probes; too high leaves less of the interval for the indirect round."""

    indirect_checks: int = 3
    """Peers asked to probe a target that missed its direct ack (ping-req). More peers make a
    false suspicion from one lossy path less likely, at the cost of 2 extra packets each.
    A peer whose ping gets no ack nacks after 0.8 * min(probe_timeout_s, probe_interval_s -
    probe_timeout_s), so that the nack arrives within the prober's period (Lifeguard: missing
    nacks, not a dead target, raise the prober's health score)."""

    tcp_fallback_probe: bool = True
    """Also ping a target over TCP when its direct UDP ack is late, and do not suspect it if
    that ack arrives by the end of the probe period (memberlist's TCP fallback). Makes a lossy
    or UDP-filtered path much less likely to look like a failure; costs a connection per
    failed direct probe."""

    suspicion_mult: int = 4
    """Minimum suspicion timeout = suspicion_mult * max(1, log10(n)) * probe_interval_s.
    Also sets how many independent confirmations shrink it: k = suspicion_mult - 2. Higher means
    fewer false deaths and slower detection."""

    suspicion_max_timeout_mult: int = 6
    """Maximum suspicion timeout = this * minimum. A suspicion starts at the maximum and shrinks
    towards the minimum with each independent confirmation (Lifeguard)."""

    awareness_max_multiplier: int = 8
    """Upper bound of the local health multiplier (Lifeguard). Failing probe periods and this
    node's suspicion timeouts are multiplied by (score + 1), score in [0, max - 1]; a healthy
    node has score 0 and is not slowed. Higher lets a struggling node back off further before
    it accuses others, at the cost of slower detection while it struggles."""

    # --- dissemination -----------------------------------------------------------------------
    gossip_interval_s: float = 0.2
    """Time between gossip rounds, in which queued updates go to ``gossip_nodes`` random peers.
    Lower spreads updates faster and costs more packets (only sent when updates are queued)."""

    gossip_nodes: int = 3
    """Fan-out of each gossip round. Higher converges in fewer rounds, costs more bandwidth."""

    gossip_to_the_dead_s: float = 30.0
    """How long dead members keep receiving gossip, so a node wrongly declared dead learns of it
    and refutes. Longer helps recovery after partitions; shorter wastes fewer packets."""

    retransmit_mult: int = 4
    """Each update is sent retransmit_mult * ceil(log10(n + 1)) times by every node that holds it.
    Higher makes reaching every node more likely under loss, at proportionally more bandwidth."""

    push_pull_interval_s: float = 30.0
    """Time between full-state exchanges (TCP) with one random member; scaled up above 32 members
    by ceil(log2(n) - log2(32)) + 1. 0 disables periodic push-pull (join still uses it). Lower
    heals divergent views (after partitions) faster at the cost of full-state transfers."""

    reconnect_interval_s: float = 30.0
    """Every this often, with probability min(1, dead / alive members), push-pull with one
    random dead (not left) member: heals a partition or an asymmetric failure that gossip alone
    cannot cross (as Serf's reconnect does above memberlist). The cluster-wide rate is about one
    attempt per dead member per interval. 0 disables."""

    reap_after_s: float = 600.0
    """How long dead and left members stay in the table before they are forgotten. A tombstone
    stops stale gossip from resurrecting a member, and a dead member is a reconnect candidate,
    so a partition shorter than this heals by itself; a longer one needs a new join (seeds,
    discovery). Must be >= gossip_to_the_dead_s. Costs ~100 bytes per member in push-pulls."""

    dead_node_reclaim_s: float = 0.0
    """After a member has been dead this long, an alive message for its id from another address
    is accepted (the node moved). 0 = never while dead (a left member may always move). A
    conflicting address is otherwise dropped and counted as ``addr_conflict``."""

    # --- sizes and streams -------------------------------------------------------------------
    udp_buffer: int = 1400
    """Largest UDP payload built or accepted, in bytes, before any sealing overhead. Must fit the
    path MTU (1400 leaves room under Ethernet's 1500). Every node of a cluster uses one value."""

    meta_max_bytes: int = 1024
    """Largest node metadata (delegate.node_meta()). Metadata travels in alive messages, so it
    must fit one packet together with the other fields."""

    load_max_bytes: int = 256
    """Largest load payload (delegate.local_load()), carried on every ack: keep it small."""

    stream_max_bytes: int = 8 * 1024 * 1024
    """Cap on one TCP push-pull frame. Must hold the whole member table (about 100 bytes plus
    meta and load per member); a larger frame is refused without being read."""

    stream_timeout_s: float = 10.0
    """Deadline for one TCP push-pull exchange (connect, write, read). Too low fails joins over
    slow links; too high keeps dead connections around."""

    def __post_init__(self) -> None:
        positive = ("probe_interval_s", "probe_timeout_s", "gossip_interval_s", "stream_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError("probe_timeout_s must be < probe_interval_s")
        for name in ("gossip_to_the_dead_s", "push_pull_interval_s", "reap_after_s",
                     "reconnect_interval_s",
                     "dead_node_reclaim_s", "indirect_checks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("suspicion_mult", "suspicion_max_timeout_mult", "awareness_max_multiplier",
                     "gossip_nodes", "retransmit_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.reap_after_s < self.gossip_to_the_dead_s:
            raise ConfigError("reap_after_s must be >= gossip_to_the_dead_s")
        if not UDP_MIN_BYTES <= self.udp_buffer <= UDP_MAX_BYTES:
            raise ConfigError(f"udp_buffer must be in [{UDP_MIN_BYTES}, {UDP_MAX_BYTES}]")
        if not 0 <= self.meta_max_bytes <= META_MAX_BYTES:
            raise ConfigError(f"meta_max_bytes must be in [0, {META_MAX_BYTES}]")
        if not 0 <= self.load_max_bytes <= LOAD_MAX_BYTES:
            raise ConfigError(f"load_max_bytes must be in [0, {LOAD_MAX_BYTES}]")
        if largest_alive_packet(meta_len=self.meta_max_bytes) > self.udp_buffer:
            raise ConfigError("meta_max_bytes too large: an alive message must fit udp_buffer")
        if self.stream_max_bytes < 64 * 1024:
            raise ConfigError("stream_max_bytes must be >= 65536")

    @classmethod
    def lan(cls, **overrides: Any) -> Self:
        """memberlist's DefaultLANConfig: LAN latencies, any cluster size."""
        return cls(**overrides)

    @classmethod
    def local(cls, **overrides: Any) -> Self:
        """Fast timings for tests on loopback (after memberlist's DefaultLocalConfig, faster).

        Failures are detected in about a second; only fit for a quiet, loss-free network.
        """
        values: dict[str, Any] = {
            "probe_interval_s": 0.2,
            "probe_timeout_s": 0.1,
            "indirect_checks": 1,
            "suspicion_mult": 3,
            "retransmit_mult": 2,
            "gossip_interval_s": 0.05,
            "push_pull_interval_s": 5.0,
            "gossip_to_the_dead_s": 5.0,
            "reconnect_interval_s": 2.0,
            "reap_after_s": 30.0,
            "stream_timeout_s": 2.0,
        }
        values.update(overrides)
        return cls(**values)


def suspicion_timeout(mult: int, n: int, interval_s: float) -> float:
    """Minimum suspicion timeout: mult * max(1, log10(n)) * interval (seconds)."""
    return mult * max(1.0, math.log10(max(1, n))) * interval_s


def retransmit_limit(mult: int, n: int) -> int:
    """Transmissions of one update per node: mult * ceil(log10(n + 1))."""
    return mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval_s: float, n: int) -> float:
    """Push-pull period for n members: interval up to 32 members, then
    interval * (ceil(log2(n) - log2(32)) + 1), so the TCP load per node grows only as log n."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval_s
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return interval_s * mult
