"""The node: configuration, catalogue, deployments and the replicas this node runs.

`Node` is an async context manager. On enter it prepares its directories and launches the
configured models; on exit it stops every engine process. HTTP handlers call its methods;
it never renders HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import shutil
import tempfile
import time
from pathlib import Path

import msgspec
import structlog

from meshnode.engines import (
    EngineOption,
    EngineUnsupported,
    Hardware,
    SupervisorConfig,
    choose_engine,
    detect_hardware,
    probe_engines,
)

from meshnode import __version__
from meshnode.mesh.identity import NodeIdentity

from .catalogue import CATALOGUE, ModelSpec, find_spec, valid_name
from .cluster import Cluster, MemberView, NodeLoad, NodeMeta
from .config import NodeConfig
from .deployments import Deployment, DeploymentTable, LaunchRequest
from .errors import DeploymentExists, InvalidDeployment, ModelNotFound, ModelUnavailable
from .replicas import Replica, ReplicaStatus

__all__ = ["DeploymentView", "Node", "NodeState"]

log = structlog.get_logger("meshnode.node")


class NodeState(enum.StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


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


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config.resolved()
        self.name = self.config.name
        self.data_dir = Path(self.config.data_dir)
        self.deployments = DeploymentTable()
        self.replicas: dict[str, Replica] = {}
        self.state = NodeState.NEW
        self.started = time.time()
        self._run_dir: Path | None = None
        self.http_port = self.config.http_port
        """The HTTP port actually bound (set by the HTTP layer when the port was 0)."""
        self._lock = asyncio.Lock()
        self._supervisor = SupervisorConfig(start_timeout_s=self.config.engine_start_timeout_s)
        self.hardware: Hardware | None = None
        self.engines: list[EngineOption] = []
        self.identity: NodeIdentity | None = None
        self.cluster: Cluster | None = None

    async def __aenter__(self) -> "Node":
        if self.state is not NodeState.NEW:
            return self
        for sub in ("models", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~104 bytes: keep them short, private (0700).
        self._run_dir = Path(tempfile.mkdtemp(prefix="meshnode-"))
        self.hardware = await asyncio.to_thread(detect_hardware)
        self.engines = await asyncio.to_thread(probe_engines, self.hardware,
                                               self.config.engine_pythons)
        log.info("node.engines", available=[o.engine for o in self.engines if o.available])
        self.identity = await asyncio.to_thread(NodeIdentity.load_or_create, self.data_dir)
        self.state = NodeState.RUNNING
        try:
            self.cluster = Cluster(self.config, self.identity.node_id, self._meta, self._load)
            await self.cluster.__aenter__()
            for model in self.config.models:
                await self.launch(LaunchRequest(model=model))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every engine process; safe to call twice."""
        if self.state is NodeState.CLOSED:
            return
        self.state = NodeState.CLOSED
        if self.cluster is not None:
            await self.cluster.leave()  # others see `left` now, not after a suspicion timeout
        replicas, self.replicas = list(self.replicas.values()), {}
        await asyncio.gather(*(r.close() for r in replicas), return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # gossip -----------------------------------------------------------------------------

    def _meta(self) -> NodeMeta:
        hw = self.hardware
        return NodeMeta(
            name=self.name, http_host=self.config.host, http_port=self.http_port,
            ram_mb=hw.ram_mb if hw else 0, gpus=len(hw.gpus) if hw else 0,
            engines=tuple(o.engine for o in self.engines if o.available),
            replicas=tuple((name, r.state) for name, r in sorted(self.replicas.items())),
            version=__version__)

    def _load(self) -> NodeLoad:
        return NodeLoad(in_flight=sum(r.in_flight for r in self.replicas.values()))

    def members(self) -> list[MemberView]:
        return self.cluster.members() if self.cluster is not None else []

    # deployments ------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> DeploymentView:
        spec = find_spec(request.model)
        name = request.name or spec.name
        if not valid_name(name):
            raise InvalidDeployment(
                f"invalid deployment name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
                ", starting with a letter or digit", param="name")
        option = self._choose_engine(spec, request.engine)
        engine = option.engine
        context = min(request.context_length or spec.context_length,
                      self.config.max_context_length)
        async with self._lock:
            if name in self.deployments:
                raise DeploymentExists(f"a deployment named {name!r} already exists: stop it "
                                       "first, or launch with another name")
            deployment = Deployment.new(
                name=name, model=request.model if spec.family == "local" else spec.name,
                engine=engine, replicas=request.replicas, chat_template=request.chat_template,
                context_length=context, origin=self.name)
            self.deployments.put(deployment)
            await self._place(deployment, spec)
        log.info("deployment.launched", name=name, model=deployment.model, engine=engine,
                 replicas=deployment.replicas)
        return self.view(name)

    async def stop(self, name: str) -> DeploymentView:
        async with self._lock:
            view = self.view(name)
            self.deployments.remove(name)
            replica = self.replicas.pop(name, None)
        if replica is not None:
            await replica.close()
        log.info("deployment.stopped", name=name)
        return msgspec.structs.replace(view, status="stopped", placed=[])

    async def scale(self, name: str, replicas: int) -> DeploymentView:
        async with self._lock:
            deployment = self._get(name)
            self.deployments.put(deployment.scaled(replicas, self.name))
        return self.view(name)

    def _get(self, name: str) -> Deployment:
        deployment = self.deployments.get(name)
        if deployment is None:
            raise ModelNotFound(f"no deployment named {name!r}: `meshnode ps` lists them, "
                                "`meshnode launch MODEL` starts one")
        return deployment

    def _choose_engine(self, spec: ModelSpec, forced: str | None) -> EngineOption:
        assert self.hardware is not None
        try:
            return choose_engine(spec.formats, spec.abilities, forced, self.engines,
                                 self.hardware)
        except EngineUnsupported as exc:
            raise InvalidDeployment(f"cannot run {spec.name!r}: {exc}", param="engine") from None

    def engine_options(self, model: str) -> list[dict[str, object]]:
        """For GET /v1/engines: each engine, whether it could run `model` here, and why not."""
        spec = find_spec(model)
        assert self.hardware is not None
        rows: list[dict[str, object]] = []
        for option in self.engines:
            try:
                choose_engine(spec.formats, spec.abilities, option.engine, self.engines,
                              self.hardware)
                rows.append({"engine": option.engine, "available": True, "reason": ""})
            except EngineUnsupported as exc:
                rows.append({"engine": option.engine, "available": False, "reason": str(exc)})
        try:
            best = self._choose_engine(spec, None).engine
        except InvalidDeployment:
            best = None
        for row in rows:
            row["default"] = row["engine"] == best
            row["node"] = self.name
        return rows

    async def _place(self, deployment: Deployment, spec: ModelSpec) -> None:
        """Single-node placement: one replica here. The mesh spreads the others."""
        python = self.config.engine_pythons.get(deployment.engine, "")
        replica = Replica(deployment, spec, node_name=self.name, data_dir=self.data_dir,
                          run_dir=self._run_dir or self.data_dir, threads=self.config.engine_threads,
                          supervisor=self._supervisor, python=python)
        self.replicas[deployment.name] = replica
        await replica.__aenter__()

    # queries ----------------------------------------------------------------------------

    def view(self, name: str) -> DeploymentView:
        d = self._get(name)
        replica = self.replicas.get(name)
        placed = [replica.status()] if replica is not None else []
        states = [p.state for p in placed]
        if not placed:
            status, message = "unplaced", "no node can hold this model"
        elif all(s == "ready" for s in states):
            status, message = ("ready", "") if len(placed) >= d.replicas else (
                "partial", f"{len(placed)} of {d.replicas} replicas placed: only "
                           f"{len(placed)} node(s) can hold it")
        elif any(s == "ready" for s in states):
            status, message = "partial", "some replicas are not ready"
        elif all(s == "failed" for s in states):
            status, message = "failed", placed[0].reason
        else:
            status, message = "loading", ""
        abilities = replica.abilities if replica is not None else ()
        return DeploymentView(
            name=d.name, model=d.model, engine=d.engine, replicas=d.replicas,
            abilities=abilities, context_length=d.context_length, created=d.created,
            version=d.version, status=status, message=message, placed=placed)

    def views(self) -> list[DeploymentView]:
        return [self.view(d.name) for d in self.deployments.all()]

    def replica(self, name: str) -> Replica:
        """The replica that serves `name`; ModelNotFound if there is no such deployment."""
        self._get(name)
        replica = self.replicas.get(name)
        if replica is None:
            raise ModelUnavailable(f"model {name!r} has no replica on a reachable node")
        return replica

    @staticmethod
    def catalogue() -> list[ModelSpec]:
        return list(CATALOGUE.values())

    async def wait_ready(self, name: str, timeout: float | None = None) -> str:
        with contextlib.suppress(KeyError):
            return await self.replicas[name].wait_ready(timeout)
        return "missing"
