"""Deployments as the API shows them: desired state, where replicas run, and a status."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from . import placement
from .cluster import NodeMeta
from .deployments import Deployment
from .replicas import Replica, ReplicaStatus

__all__ = ["DeploymentView", "deployment_status", "deployment_view", "placed_replicas"]


class DeploymentView(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment as the API shows it: desired state plus where its replicas run."""

    name: str
    model: str
    engine: str
    replicas: int
    abilities: tuple[str, ...]
    context_length: int
    created: int
    version: int
    status: str
    """ready (all replicas ready), partial, loading, failed, or unplaced."""
    message: str
    placed: list[ReplicaStatus]
    nodes: tuple[str, ...] = ()
    """Placement constraint: only these nodes (none: any)."""
    labels: tuple[str, ...] = ()
    """Placement constraint: only nodes with every one of these labels."""
    min_ram_mb: int = 0
    """Placement constraint: only nodes with at least this much RAM."""
    engine_args: tuple[str, ...] = ()
    """Added to the vllm or sglang server's command line."""


def deployment_view(d: Deployment, members: Mapping[str, NodeMeta], me: str,
                    local: Replica | None, where: placement.Placed,
                    abilities: tuple[str, ...]) -> DeploymentView:
    """Deployment `d` as the API shows it, with its replicas where they run (placed_replicas)
    and where placement puts it (`where`)."""
    placed = placed_replicas(d.name, members, me, local)
    chosen = {members[n].name for n in where.holders if n in members}
    status, message = deployment_status(d, placed, where, chosen)
    return DeploymentView(
        name=d.name, model=d.model, engine=d.engine, replicas=d.replicas, abilities=abilities,
        context_length=d.context_length, created=d.created, version=d.version, status=status,
        message=message, placed=placed, nodes=d.nodes, labels=d.labels,
        min_ram_mb=d.min_ram_mb, engine_args=d.engine_args)


def deployment_status(d: Deployment, placed: list[ReplicaStatus], where: placement.Placed,
                      chosen: set[str] | None = None) -> tuple[str, str]:
    """(status, message): ready, partial, failed, unplaced (with why) or loading. `chosen`:
    the names of the nodes placement puts it on; a ready replica elsewhere is leaving (it
    serves until its successor is ready), which the message says."""
    states = [p.state for p in placed]
    ready = states.count("ready")
    reason, able = where.reason, where.able
    leaving = sorted(p.node for p in placed if p.state == "ready"
                     and chosen is not None and p.node not in chosen)
    if ready >= d.replicas and leaving and reason:
        status, message = "ready", (f"{reason}; the replica(s) on {', '.join(leaving)} "
                                    "serve until a node can hold it")
    elif ready >= d.replicas and leaving:
        status, message = "ready", (f"moving: the replica(s) on {', '.join(leaving)} "
                                    "unload once their successors are ready")
    elif ready >= d.replicas:
        status, message = "ready", ""
    elif ready and able < d.replicas:
        status, message = "partial", (f"{ready} of {d.replicas} replicas ready: only "
                                      f"{able} node(s) can hold it")
    elif ready:
        status, message = "partial", "some replicas are not ready"
    elif placed and all(s == "failed" for s in states):
        status, message = "failed", placed[0].reason or "the replica failed to load"
    elif reason:
        status, message = "unplaced", reason
    else:
        status, message = "loading", ""
    return status, message


def placed_replicas(name: str, members: Mapping[str, NodeMeta], me: str,
                    local: Replica | None) -> list[ReplicaStatus]:
    """Every replica of `name` on the members (node id -> meta), by node name; our own (node
    `me`) from its live status, the others' as they gossip them."""
    placed: list[ReplicaStatus] = []
    for node_id, meta in sorted(members.items(), key=lambda kv: kv[1].name):
        if node_id == me:
            if local is not None:
                placed.append(local.status())
        else:
            placed += [ReplicaStatus(node=meta.name, state=state)
                       for n, state in meta.replicas if n == name]
    return placed
