"""Deployments: the desired state of what the cluster serves.

A deployment names a model and how many replicas of it to run. The request's `model` field is
a deployment's name (which defaults to the model's name). Versions are nanosecond timestamps
with the origin node as tie-break, so a replicated table can merge last-writer-wins.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["Deployment", "DeploymentTable", "LaunchRequest", "ScaleRequest"]


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of POST /v1/deployments."""

    model: str
    name: str | None = None
    engine: str | None = None
    replicas: Annotated[int, Meta(ge=1, le=64)] = 1
    chat_template: Annotated[str, Meta(min_length=1)] | None = None
    context_length: Annotated[int, Meta(ge=128)] | None = None


class ScaleRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Body of PATCH /v1/deployments/{name}."""

    replicas: Annotated[int, Meta(ge=1, le=64)]


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

    @classmethod
    def new(cls, *, name: str, model: str, engine: str, replicas: int,
            chat_template: str | None, context_length: int, origin: str) -> "Deployment":
        now = time.time_ns()
        return cls(name=name, model=model, engine=engine, replicas=replicas,
                   chat_template=chat_template, context_length=context_length,
                   created=now // 1_000_000_000, version=now, origin=origin)

    def scaled(self, replicas: int, origin: str) -> "Deployment":
        return msgspec.structs.replace(self, replicas=replicas,
                                       version=max(time.time_ns(), self.version + 1),
                                       origin=origin)


class DeploymentTable:
    """Deployments by name. Single-writer on one node; merge() is the replication hook."""

    def __init__(self) -> None:
        self._items: dict[str, Deployment] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Deployment | None:
        return self._items.get(name)

    def put(self, deployment: Deployment) -> None:
        self._items[deployment.name] = deployment

    def remove(self, name: str) -> Deployment | None:
        return self._items.pop(name, None)

    def all(self) -> list[Deployment]:
        return sorted(self._items.values(), key=lambda d: d.name)

    def merge(self, other: Deployment) -> bool:
        """Keep the newer of ours and theirs by (version, origin); True if ours changed."""
        mine = self._items.get(other.name)
        if mine is not None and (mine.version, mine.origin) >= (other.version, other.origin):
            return False
        self._items[other.name] = other
        return True
