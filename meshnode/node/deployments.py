"""Deployments: the desired state of what the cluster serves.

A deployment names a model and how many replicas of it to run. The request's `model` field is
a deployment's name (which defaults to the model's name). Versions are nanosecond timestamps
with the origin node as tie-break, so a replicated table can merge last-writer-wins. A stop
writes a tombstone (`deleted=True`, a newer version) that replicates like any other change and
is forgotten `tombstone_ttl_s` after it was written; a node that was away longer than that can
bring a stopped deployment back, so the TTL is a trade of memory against such long absences.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from .config import Label, NodeName
from .errors import ConfigError, InvalidDeployment

__all__ = ["Deployment", "DeploymentTable", "LaunchRequest", "UpdateRequest"]

Name = NodeName
"""A node name as a placement constraint (what `meshnode start --name` accepts)."""
EngineArg = Annotated[str, Meta(min_length=1, max_length=4096)]


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/deployments. A field it does not know is refused, not dropped: a
    misspelt constraint would otherwise launch without it."""

    model: str
    name: str | None = None
    engine: str | None = None
    replicas: Annotated[int, Meta(ge=1, le=64)] = 1
    chat_template: Annotated[str, Meta(min_length=1)] | None = None
    context_length: Annotated[int, Meta(ge=128)] | None = None
    """Tokens of context; default the model's window, capped at the node's
    max_context_length. More than either is refused."""
    engine_args: Annotated[tuple[EngineArg, ...], Meta(max_length=64)] = ()
    """Added to the command line of the vllm or sglang server (refused for other engines)."""
    nodes: Annotated[tuple[Name, ...], Meta(max_length=64)] = ()
    """Pin: run replicas only on nodes with these names."""
    labels: Annotated[tuple[Label, ...], Meta(max_length=16)] = ()
    """Run replicas only on nodes started with every one of these labels (`--label`)."""
    min_ram_mb: Annotated[int, Meta(ge=0)] = 0
    """Run replicas only on nodes with at least this much RAM."""


class UpdateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                    omit_defaults=True):
    """Body of PATCH /v1/deployments/{name}: the fields to change, the others keep their
    values. An empty list clears a pin (`nodes`) or the labels, `min_ram_mb: 0` the minimum;
    the model, engine and name cannot change (stop and launch again)."""

    replicas: Annotated[int, Meta(ge=1, le=64)] | None = None
    nodes: Annotated[tuple[Name, ...], Meta(max_length=64)] | None = None
    labels: Annotated[tuple[Label, ...], Meta(max_length=16)] | None = None
    min_ram_mb: Annotated[int, Meta(ge=0)] | None = None

    def check(self) -> None:
        if (self.replicas, self.nodes, self.labels, self.min_ram_mb) == (None,) * 4:
            raise InvalidDeployment("nothing to change: give replicas, nodes, labels or "
                                    "min_ram_mb")


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model: str
    engine: str
    replicas: int
    chat_template: str | None
    context_length: int
    created: int
    """Unix seconds."""
    version: int
    """Nanosecond timestamp of the last change: the higher version wins a merge."""
    origin: str
    """Name of the node that made the last change."""
    deleted: bool = False
    """A tombstone: the deployment was stopped at `version`."""
    nodes: tuple[str, ...] = ()
    """Placement constraint: only nodes of these names (none: any)."""
    labels: tuple[str, ...] = ()
    """Placement constraint: only nodes that carry every one of these labels."""
    min_ram_mb: int = 0
    """Placement constraint: only nodes with at least this much RAM."""
    size_mb: int = 0
    """The model's size as the launching node saw it (catalogue, or the file's size), so
    every node budgets the same RAM for a replica, whether or not it has the file."""
    abilities: tuple[str, ...] = ()
    """What the model serves (chat, completion, embed, rerank) as the launching node read it,
    so a node without the file (a model given by path) lists it right; () for a deployment
    written before this field: each node then reads its own copy of the file."""
    engine_args: tuple[str, ...] = ()
    """Added to the vllm or sglang server's command line, in this order."""

    @property
    def shape(self) -> tuple[object, ...]:
        """What a running replica depends on: a change of any of these restarts it."""
        return (self.model, self.engine, self.chat_template, self.context_length, self.created,
                self.engine_args)

    @classmethod
    def new(cls, *, name: str, model: str, engine: str, replicas: int,
            chat_template: str | None, context_length: int, origin: str,
            nodes: tuple[str, ...] = (), labels: tuple[str, ...] = (), min_ram_mb: int = 0,
            size_mb: int = 0, abilities: tuple[str, ...] = (),
            engine_args: tuple[str, ...] = ()) -> "Deployment":
        now = time.time_ns()
        return cls(name=name, model=model, engine=engine, replicas=replicas,
                   chat_template=chat_template, context_length=context_length,
                   created=now // 1_000_000_000, version=now, origin=origin,
                   nodes=tuple(sorted(set(nodes))), labels=tuple(sorted(set(labels))),
                   min_ram_mb=min_ram_mb, size_mb=size_mb, abilities=abilities,
                   engine_args=engine_args)

    def updated(self, change: UpdateRequest, origin: str) -> "Deployment":
        """This deployment with `change`'s fields (those not None), as a newer version."""
        fields: dict[str, object] = {}
        if change.replicas is not None:
            fields["replicas"] = change.replicas
        if change.nodes is not None:
            fields["nodes"] = tuple(sorted(set(change.nodes)))
        if change.labels is not None:
            fields["labels"] = tuple(sorted(set(change.labels)))
        if change.min_ram_mb is not None:
            fields["min_ram_mb"] = change.min_ram_mb
        return msgspec.structs.replace(self, **fields, origin=origin,
                                       version=max(time.time_ns(), self.version + 1))

    def tombstone(self, origin: str) -> "Deployment":
        return msgspec.structs.replace(self, deleted=True,
                                       version=max(time.time_ns(), self.version + 1),
                                       origin=origin)


class DeploymentTable:
    """Deployments by name, tombstones included; `merge` is last-writer-wins by (version, origin).

    Reads (`in`, `get`, `all`) see live deployments only; `entries` is the whole replicated
    state. Merging the same entries in any order gives the same table, so two tables that have
    seen the same writes have the same `digest`.
    """

    def __init__(self, tombstone_ttl_s: float = 3600.0) -> None:
        self._items: dict[str, Deployment] = {}
        self.tombstone_ttl_s = tombstone_ttl_s

    def __contains__(self, name: object) -> bool:
        d = self._items.get(name)  # type: ignore[call-overload]
        return d is not None and not d.deleted

    def get(self, name: str) -> Deployment | None:
        d = self._items.get(name)
        return d if d is not None and not d.deleted else None

    def entry(self, name: str) -> Deployment | None:
        """The entry of `name`, a tombstone included."""
        return self._items.get(name)

    def put(self, deployment: Deployment) -> None:
        self._items[deployment.name] = deployment

    def all(self) -> list[Deployment]:
        """Live deployments, by name."""
        return sorted((d for d in self._items.values() if not d.deleted), key=lambda d: d.name)

    def entries(self) -> list[Deployment]:
        """Every entry, tombstones included, by name: what a peer merges."""
        return sorted(self._items.values(), key=lambda d: d.name)

    def _expired(self, d: Deployment, now_ns: int) -> bool:
        return d.deleted and now_ns - d.version > self.tombstone_ttl_s * 1e9

    def merge(self, other: Deployment) -> bool:
        """Keep the newer of ours and theirs by (version, origin); True if ours changed.

        An expired tombstone is refused, so a purged one does not come back from a peer that
        has not purged it yet."""
        if self._expired(other, time.time_ns()):
            return False
        mine = self._items.get(other.name)
        if mine is not None and (mine.version, mine.origin) >= (other.version, other.origin):
            return False
        self._items[other.name] = other
        return True

    def purge(self) -> int:
        """Forget expired tombstones; how many."""
        now = time.time_ns()
        old = [name for name, d in self._items.items() if self._expired(d, now)]
        for name in old:
            del self._items[name]
        return len(old)

    def digest(self) -> str:
        """16 hex digits over every (name, version, origin, deleted): equal tables, equal
        digests; gossiped so peers can tell when to pull."""
        h = hashlib.blake2b(digest_size=8, person=b"meshnode/deps")
        for d in self.entries():
            h.update(msgspec.msgpack.encode((d.name, d.version, d.origin, d.deleted)))
        return h.hexdigest()

    def save(self, path: Path) -> None:
        """Write every entry (tombstones included) to `path` atomically: a crash leaves the
        old file or the new one, never half of one."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(self.entries()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: Path) -> int:
        """Merge the entries saved at `path` (none if it does not exist); how many changed.
        ConfigError, with the table unchanged, if the file is not a saved table."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            entries = msgspec.json.decode(data, type=list[Deployment])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{path} is not a saved deployment table ({exc}): move it away "
                              "and restart; the node then learns the table from its peers"
                              ) from None
        return sum(self.merge(d) for d in entries)
