"""Placement: which nodes hold a deployment's replicas. Pure functions of the membership view.

Every node runs the same computation on the same gossiped view, so they agree with no
coordinator:

    candidates(d) = {node: weight} for members whose engines include d.engine, whose RAM
                    holds the model (ram_mb >= size_mb * RAM_HEADROOM, when both are known),
                    and whose replica of d has not failed
    weight        = ram_mb (1.0 when unknown): bigger nodes win proportionally more deployments
    holders(d)    = rendezvous_top(d.name, candidates(d), d.replicas)

Rendezvous hashing moves only what it must: when a node dies, only the deployments it held
get a new holder (the next-best score), and every other holder stays put. A node that finds
itself a holder starts a replica; one that is no longer a holder keeps serving until every
holder reports the replica ready (`can_unload`), so a move never leaves a gap.

A replica that failed (its engine never became ready: a missing model file on that node, not
enough memory, a broken engine install) stays on its node as a failed record, gossiped with
its reason, and takes that node out of the deployment's candidates: the next node in
rendezvous order takes the replica over. A model given by a path that exists on only some
nodes therefore settles on a node that has the file. The record goes when the deployment
changes (scale, relaunch) or stops, and the node may then try again.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshnode.mesh.hashing import rendezvous_top

from .cluster import NodeMeta
from .deployments import Deployment

__all__ = ["RAM_HEADROOM", "can_unload", "candidates", "holders", "unplaced_reason"]

RAM_HEADROOM = 1.2
"""A node must have this many times the model's size in RAM (KV cache, engine, the OS)."""


def candidates(deployment: Deployment, members: Mapping[str, NodeMeta],
               size_mb: int = 0) -> dict[str, float]:
    """Node id -> rendezvous weight, for the members that can hold `deployment`."""
    out: dict[str, float] = {}
    for node_id, meta in members.items():
        if deployment.engine not in meta.engines:
            continue
        if (deployment.name, "failed") in meta.replicas:
            continue
        if size_mb and meta.ram_mb and meta.ram_mb < size_mb * RAM_HEADROOM:
            continue
        out[node_id] = float(meta.ram_mb) if meta.ram_mb > 0 else 1.0
    return out


def holders(deployment: Deployment, members: Mapping[str, NodeMeta],
            size_mb: int = 0) -> list[str]:
    """The node ids that should run `deployment`'s replicas, best first ([] if deleted)."""
    if deployment.deleted:
        return []
    return rendezvous_top(deployment.name, candidates(deployment, members, size_mb),
                          deployment.replicas)


def can_unload(name: str, chosen: list[str], members: Mapping[str, NodeMeta]) -> bool:
    """True once every holder in `chosen` gossips a ready replica of `name`: a node that is no
    longer chosen may then drop its own. With no holder at all it keeps serving."""
    if not chosen:
        return False
    for node_id in chosen:
        meta = members.get(node_id)
        if meta is None or (name, "ready") not in meta.replicas:
            return False
    return True


def unplaced_reason(deployment: Deployment, members: Mapping[str, NodeMeta],
                    size_mb: int = 0) -> str:
    """Why no node can hold `deployment` ("" when some node can)."""
    if candidates(deployment, members, size_mb):
        return ""
    failed = [m.name for m in members.values() if (deployment.name, "failed") in m.replicas]
    if failed:
        return (f"it failed to load on {', '.join(sorted(failed))} and no other node can hold "
                f"it: see each node's reason in `meshnode ps`, fix it, then relaunch")
    with_engine = [m for m in members.values() if deployment.engine in m.engines]
    if not with_engine:
        return (f"no node can hold this model: none of the {len(members)} reachable node(s) "
                f"has the {deployment.engine} engine")
    need = int(size_mb * RAM_HEADROOM)
    return (f"no node can hold this model: it needs {need} MB of RAM and the nodes with the "
            f"{deployment.engine} engine have at most {max(m.ram_mb for m in with_engine)} MB")
