"""The node: configuration, catalogue, deployments and the replicas this node runs.

`Node` is an async context manager. On enter it joins the mesh, starts its two background
tasks and launches the configured models; on exit it stops every engine process. HTTP
handlers call its methods; it never renders HTTP.

Background tasks (owned here, cancelled and awaited on close):
- `_reconcile_loop`, every `reconcile_interval_s` and at once on a membership event or a
  table change: pull tables whose gossiped digest differs (sync.py), then place (placement.py):
  start the replicas this node is a holder of, unload those it no longer holds once their new
  holders are ready, and those whose deployment is gone at once.
- `_events_loop`: turns membership events into a wake-up of the reconciler.
- one per replica that moved (retiring.py): it finishes what it serves, then closes.

Stopping (`start_drain`, `drain`, before close): the node gossips that it is stopping, so
placement leaves it out and its replicas move to other nodes while it keeps serving them; the
reconciler unloads each once its new holders are ready, as for any move.
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

from meshnode import __version__
from meshnode.engines import (SERVER_ENGINES, EngineOption, Hardware, InvalidRequest,
                              SupervisorConfig, check_engine_args, detect_hardware,
                              probe_engines)
from meshnode.mesh import MemberDead, MemberIndirect, MemberLeft, MemberState, MemberSuspected
from meshnode.mesh.crypto_errors import RevocationError, SecurityError
from meshnode.mesh.identity import NodeIdentity

from . import engine_choice, placement
from .catalogue import context_window, deployment_spec, find_spec, valid_name
from .chat_template import check_chat_template
from .cluster import Cluster, MemberView, NodeLoad, NodeMeta, node_load
from .config import NodeConfig
from .deployments import Deployment, DeploymentTable, LaunchRequest, UpdateRequest
from .errors import (ConfigError, DeploymentExists, InvalidDeployment, ModelNotFound,
                     ModelUnavailable, ReplicaBusy)
from .keysync import NodeKeys
from .peer_queries import find_spec_anywhere
from .peers import PLACEMENT_STATES, PeerView, Target
from .prefixes import PrefixLedger
from .replicas import Replica
from .retiring import Retiring
from .router import Router
from .security import INTERNAL_REVOCATION_PATH, ClusterSecurity, data_dir_identity
from .sync import DeploymentSync, Peer, TableSync, encode_entries
from .views import DeploymentView, deployment_view

__all__ = ["DeploymentView", "Node", "NodeState"]

log = structlog.get_logger("meshnode.node")


class NodeState(enum.StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class Node:
    def __init__(self, config: NodeConfig, security: ClusterSecurity | None = None) -> None:
        """`security` (security.load_security) makes this a node of a signed cluster."""
        self.config = config.resolved()
        self.security = security
        self.internal_port = 0
        """Port of the internal mTLS listener (set by the HTTP layer); 0 in an open cluster."""
        self.name = self.config.name
        self.data_dir = Path(self.config.data_dir)
        self.deployments = DeploymentTable(self.config.tombstone_ttl_s)
        self.replicas: dict[str, Replica] = {}
        self.state = NodeState.NEW
        self.started = time.time()
        self._run_dir: Path | None = None
        self.http_port = self.config.http_port
        """The HTTP port actually bound (set by the HTTP layer when the port was 0)."""
        self.draining = False
        """Stopping: gossiped, so placement moves our replicas elsewhere (drain)."""
        self._lock = asyncio.Lock()
        self._supervisor = SupervisorConfig(start_timeout_s=self.config.engine_start_timeout_s)
        self.hardware: Hardware | None = None
        self.engines: list[EngineOption] = []
        self.identity: NodeIdentity | None = None
        self.node_id = ""
        self.cluster: Cluster | None = None
        self.router = Router()
        self.prefixes = PrefixLedger()
        """The prompt prefixes each local replica served lately, gossiped for routing."""
        self.peers = PeerView(lambda: self.node_id, lambda: self.cluster, security)
        ssl_context = security.client_context() if security is not None else None
        verify = self.peers.verify if security is not None else None
        self.sync = DeploymentSync(self.deployments, self._table_changed,
                                   ssl_context=ssl_context, verify=verify)
        self.revocation_sync: TableSync | None = None
        if security is not None:
            self.revocation_sync = TableSync(
                INTERNAL_REVOCATION_PATH, lambda: str(security.revocation_seq),
                security.merge_revocation, self._table_changed, ssl_context=ssl_context,
                verify=verify, what="revocation")
        self.api_keys = NodeKeys(self.data_dir, self.name, self._table_changed,
                                 tombstone_ttl_s=self.config.tombstone_ttl_s,
                                 ssl_context=ssl_context, verify=verify)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.retiring = Retiring(self.config.grace_s)
        """Our replicas that moved elsewhere, finishing what they serve (retiring.py)."""
        self._abilities: dict[str, tuple[int, tuple[str, ...]]] = {}  # name -> (version, ..)

    @property
    def _table_path(self) -> Path:
        return self.data_dir / "deployments.json"

    async def __aenter__(self) -> Node:
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
        if self.security is not None:
            self.identity = self.security.identity
        else:
            self.identity = await asyncio.to_thread(data_dir_identity, self.data_dir)
        self.node_id = self.identity.node_id
        # The table as this node last saw it: a cluster restarted as a whole comes back with
        # its deployments; peers' newer writes (and tombstones) win when they are merged.
        await asyncio.to_thread(self.deployments.load, self._table_path)
        self.state = NodeState.RUNNING
        try:
            self.cluster = Cluster(self.config, self.node_id, self._meta, self._load,
                                   self.security)
            await self.cluster.__aenter__()
            await self.sync.__aenter__()
            if self.security is not None and self.revocation_sync is not None:
                rl = self.security.revocation
                if rl is not None:
                    self.cluster.revoke(rl.node_ids)
                self.security.on_revoked.append(self._revoked)
                await self.revocation_sync.__aenter__()
            await self.api_keys.__aenter__()
            self._tasks = [
                asyncio.create_task(self._reconcile_loop(), name="node:reconcile"),
                asyncio.create_task(self._events_loop(), name="node:events"),
            ]
            for model in self.config.models:
                if find_spec(model).name not in self.deployments:  # saved from a last run
                    await self.launch(LaunchRequest(model=model))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_drain(self) -> list[str]:
        """This node is stopping: gossip it, so placement moves its replicas to other nodes.
        The replicas that move (`drain` waits for them)."""
        if self.cluster is None:
            return []
        self.draining = True
        self.cluster.refresh_meta()
        self._wake.set()
        moving = self._moving()
        log.info("node.draining", replicas=moving)
        return moving

    async def drain(self, timeout_s: float, now: asyncio.Event) -> list[str]:
        """Keep serving the replicas start_drain moves until each is unloaded here (its new
        holders are ready: the reconciler) or has nowhere else to go; at most `timeout_s`, or
        until `now` is set (a second signal). Those still here."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._moving() and not now.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await now.wait()
        left = self._moving()
        log.info("node.drained", left=left)
        return left

    def _moving(self) -> list[str]:
        """Our replicas (not failed) of deployments that placement gives other holders."""
        live = {d.name: d for d in self.deployments.all()}
        where = placement.place(live.values(), self._placement_view())
        return sorted(n for n, r in self.replicas.items() if r.state != "failed" and n in live
                      and set(where[n].holders) - {self.node_id})

    async def close(self) -> None:
        """Stop every engine process; safe to call twice."""
        if self.state is NodeState.CLOSED:
            return
        self.state = NodeState.CLOSED
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.retiring.close()
        self.peers.close()
        await self.sync.close()
        if self.revocation_sync is not None:
            await self.revocation_sync.close()
        await self.api_keys.close()
        if self.cluster is not None:
            await self.cluster.leave()  # others see `left` now, not after a suspicion timeout
        async with self._lock:
            replicas, self.replicas = list(self.replicas.values()), {}
        await asyncio.gather(*(r.close() for r in replicas), return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # gossip -----------------------------------------------------------------------------

    def _meta(self) -> NodeMeta:
        hw = self.hardware
        ready = [n for n, r in self.replicas.items() if r.state == "ready"]
        for name in ready:  # prefixes that moved to another replica leave our ledger
            ledgers = {n: h[2] for n, h in self._holders(name)[0].items()}
            self.prefixes.forget(name, self.router.ceded(name, self.node_id, ledgers))
        return self.prefixes.meta(NodeMeta(
            name=self.name, http_host=self.config.host, http_port=self.http_port,
            ram_mb=hw.ram_mb if hw else 0, gpus=len(hw.gpus) if hw else 0,
            gpu_mb=tuple(g.memory_mb for g in hw.gpus) if hw else (),
            labels=self.config.labels, replica_extra_mb=self.config.prompt_cache_mb,
            engines=tuple(o.engine for o in self.engines if o.available),
            replicas=tuple((name, r.state) for name, r in sorted(self.replicas.items())),
            version=__version__, deployments_digest=self.deployments.digest(),
            internal_port=self.internal_port,
            revocation_seq=self.security.revocation_seq if self.security else 0,
            keys_digest=self.api_keys.digest(), draining=self.draining), ready)

    def _load(self) -> NodeLoad:
        return node_load((n, r.in_flight) for n, r in sorted(self.replicas.items()))

    def members(self) -> list[MemberView]:
        return self.cluster.members(self.peers.reach.down) if self.cluster is not None else []

    def _placement_view(self) -> dict[str, NodeMeta]:
        """Node id -> meta of every member placement counts on, this node included (fresh)."""
        view = {node_id: meta for node_id, meta, _ in self.peers.peers(PLACEMENT_STATES)}
        view[self.node_id] = self._meta()
        return view

    def revocation_bytes(self) -> bytes:
        """The revocation list this node holds (empty if none), for a peer's pull."""
        rl = self.security.revocation if self.security is not None else None
        return rl.to_bytes() if rl is not None else b""

    def adopt_revocation(self, data: bytes) -> int:
        """Merge a CA-signed revocation list (see security.py); the sequence now held.
        ConfigError for an open node or a list that is not this cluster CA's."""
        if self.security is None:
            raise ConfigError("this node has no cluster CA, so it has no revocation list: "
                              "start it with --ca and --cert")
        try:
            adopted = self.security.adopt_revocation(data)
        except (RevocationError, SecurityError) as exc:
            raise ConfigError(f"revocation list refused: {exc}") from None
        if adopted:
            self._table_changed()
        return self.security.revocation_seq

    def _revoked(self, node_ids: frozenset[str]) -> None:
        if self.cluster is not None:
            self.cluster.revoke(node_ids)
        self._wake.set()

    def _table_changed(self) -> None:
        """The deployment table changed (a local write or a merge): save it, gossip it,
        place now."""
        if self.state is NodeState.RUNNING:
            try:
                self.deployments.save(self._table_path)
            except OSError as exc:
                log.error("deployments.save_failed", path=str(self._table_path), error=str(exc))
        if self.cluster is not None:
            self.cluster.refresh_meta()
        self._wake.set()

    # reconciler ---------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        assert self.cluster is not None
        async for event in self.cluster.mesh.events():
            if isinstance(event, MemberIndirect):  # no change of state: a hint
                self.peers.check_reach(event.member)
                continue
            self.peers.changed()  # before the reconciler acts on it (it may unload ours)
            if isinstance(event, MemberDead | MemberLeft):
                self.peers.gone(event.member)  # in-flight forwards there fail over now
            elif isinstance(event, MemberSuspected):
                self.peers.suspected(event.member)  # and unanswered ones once it lasts
            self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.deployments.purge():
                    self._table_changed()
                alive = [(node_id, self.peers.url(meta), meta)
                         for node_id, meta, _ in self.peers.peers((MemberState.ALIVE,))]
                self.sync.check(Peer(i, url, m.deployments_digest) for i, url, m in alive)
                if self.revocation_sync is not None and self.security is not None:
                    ours = self.security.revocation_seq
                    self.revocation_sync.check(Peer(i, url, str(m.revocation_seq))
                                               for i, url, m in alive if m.revocation_seq > ours)
                self.api_keys.check(Peer(i, url, m.keys_digest) for i, url, m in alive)
                await self._reconcile()
            except Exception:  # a bug here must not stop placement for good
                log.exception("reconcile.failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.reconcile_interval_s):
                    await self._wake.wait()

    async def _reconcile(self) -> None:
        """Start the replicas this node holds; unload those it no longer holds."""
        closing: list[Replica] = []
        changed = False  # a replica moved away or came back: gossip it
        async with self._lock:
            if self.state is not NodeState.RUNNING:
                return
            view = self._placement_view()
            live = {d.name: d for d in self.deployments.all()}
            for name, running in list(self.replicas.items()):
                d = live.get(name)
                if running.outdated(d):
                    closing.append(self.replicas.pop(name))
                    log.info("replica.unload", model=name, reason="changed" if d else "stopped")
            where = placement.place(live.values(), view)
            for d in live.values():
                chosen = where[d.name].holders
                replica = self.replicas.get(d.name)
                if self.node_id in chosen:
                    if replica is None and (back := self.retiring.take_back(d)) is not None:
                        self.replicas[d.name] = back  # it moved away and is still loaded
                        changed = True
                    elif replica is None:
                        await self._start_replica(d, where[d.name].gpus.get(self.node_id))
                elif replica is not None and replica.state != "failed" \
                        and placement.can_unload(d.name, chosen, view):
                    # A failed replica stays as a record: it keeps this node out of the
                    # candidates (placement.py) until the deployment changes.
                    log.info("replica.unload", model=d.name, reason="moved",
                             holders=[view[h].name for h in chosen])
                    self.retiring.add(self.replicas.pop(d.name))
                    changed = True
        if closing or changed:
            if self.cluster is not None:
                self.cluster.refresh_meta()
            await asyncio.gather(*(r.close() for r in closing), return_exceptions=True)

    async def _start_replica(self, d: Deployment, placed_gpu: int | None) -> None:
        gpu = placement.local_gpu(d, [g.memory_mb for g in self.hardware.gpus] if self.hardware
                                  else [], (r.gpu for r in self.replicas.values()), placed_gpu)
        replica = Replica(d, deployment_spec(d.model, d.name, d.context_length, d.abilities),
                          gpu=gpu, node_name=self.name, data_dir=self.data_dir,
                          run_dir=self._run_dir or self.data_dir,
                          threads=self.config.engine_threads, supervisor=self._supervisor,
                          python=self.config.engine_pythons.get(d.engine, ""),
                          prompt_cache_mb=self.config.prompt_cache_mb)
        self.replicas[d.name] = replica
        await replica.__aenter__()
        log.info("replica.start", model=d.name, engine=d.engine, gpu=gpu)
        if self.cluster is not None:
            self.cluster.refresh_meta()

    # deployments ------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> DeploymentView:
        """Validate (model, name, an engine some live node has), write it, let placement go."""
        if request.chat_template is not None:
            check_chat_template(request.chat_template)
        spec = await find_spec_anywhere(request.model, self.peers.ask)
        name = request.name or spec.name
        if not valid_name(name):
            raise InvalidDeployment(
                f"invalid deployment name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
                ", starting with a letter or digit", param="name")
        assert self.hardware is not None
        engine = engine_choice.choose(spec, request.engine, self.engines, self.hardware, {
            e for _, meta, _ in self.peers.peers(PLACEMENT_STATES) for e in meta.engines}).engine
        context = context_window(spec, request.context_length, self.config.max_context_length)
        try:
            check_engine_args(engine, request.engine_args)
        except InvalidRequest as exc:
            raise InvalidDeployment(str(exc), param=exc.param) from None
        async with self._lock:
            if name in self.deployments:
                raise DeploymentExists(f"a deployment named {name!r} already exists: stop it "
                                       "first, or launch with another name")
            deployment = Deployment.new(
                name=name, model=spec.name if spec.family != "local" else
                str(Path(request.model).expanduser().absolute()),  # the same on every node
                engine=engine, replicas=request.replicas, chat_template=request.chat_template,
                context_length=context, origin=self.name, nodes=request.nodes,
                labels=request.labels, min_ram_mb=request.min_ram_mb, size_mb=spec.size_mb,
                abilities=spec.abilities, engine_args=request.engine_args)
            old = self.deployments.entry(name)
            if old is not None and old.version >= deployment.version:  # clock behind a peer
                deployment = msgspec.structs.replace(deployment, version=old.version + 1)
            self.deployments.put(deployment)
        self._table_changed()
        await self._reconcile()
        log.info("deployment.launched", name=name, model=deployment.model, engine=engine,
                 replicas=deployment.replicas)
        return self.view(name)

    async def stop(self, name: str) -> DeploymentView:
        async with self._lock:
            view = self.view(name)
            self.deployments.put(self._get(name).tombstone(self.name))
        self._table_changed()
        await self._reconcile()
        log.info("deployment.stopped", name=name)
        return msgspec.structs.replace(view, status="stopped", placed=[])

    async def update(self, name: str, change: UpdateRequest) -> DeploymentView:
        """Change a deployment's replicas or constraints (PATCH); placement follows."""
        async with self._lock:
            self.deployments.put(self._get(name).updated(change, self.name))
        self._table_changed()
        await self._reconcile()
        log.info("deployment.updated", name=name, change=msgspec.json.encode(change).decode())
        return self.view(name)

    def deployment_entries(self) -> bytes:
        """The whole table, tombstones included, for a peer's sync (msgpack)."""
        return encode_entries(self.deployments)

    def _get(self, name: str) -> Deployment:
        deployment = self.deployments.get(name)
        if deployment is None:
            raise ModelNotFound(f"no deployment named {name!r}: `meshnode ps` lists them, "
                                "`meshnode launch MODEL` starts one")
        return deployment

    def engine_options(self, model: str) -> list[dict[str, object]]:
        """For GET /v1/engines: each engine, whether it could run `model` here, and why not."""
        assert self.hardware is not None
        return engine_choice.options(find_spec(model), self.engines, self.hardware, self.name)

    # queries ----------------------------------------------------------------------------

    def view(self, name: str) -> DeploymentView:
        """The deployment as the cluster runs it: every replica on a live member, ours too."""
        return self.views([self._get(name)])[0]

    def views(self, table: list[Deployment] | None = None) -> list[DeploymentView]:
        """Those of `table` (default: all), placed once for all (place() covers the table)."""
        members = self._placement_view()
        where = placement.place(self.deployments.all(), members)
        return [deployment_view(d, members, self.node_id, self.replicas.get(d.name),
                                where[d.name], self.abilities(d.name))
                for d in (self.deployments.all() if table is None else table)]

    def checks(self, name: str) -> bool:
        """Whether a request for deployment `name` is checked here, before it is routed,
        against what meshnode's engine host honours (the request's `check()`: n = 1, no
        logprobs, tools or logit_bias, ...): not for vLLM or SGLang, whose own servers judge
        it and offer those. ModelNotFound."""
        return self._get(name).engine not in SERVER_ENGINES

    def abilities(self, name: str) -> tuple[str, ...]:
        """What deployment `name` serves (chat, completion, embed, rerank); ModelNotFound."""
        d = self._get(name)
        replica = self.replicas.get(name)
        if replica is not None:
            return replica.abilities
        cached = self._abilities.get(name)
        if cached is not None and cached[0] == d.version:
            return cached[1]  # a model given by path is not re-read on every request
        abilities = d.abilities or tuple(
            deployment_spec(d.model, d.name, d.context_length).abilities)  # an older entry
        if d.chat_template and "chat" not in abilities:
            abilities += ("chat",)
        if len(self._abilities) > 1024:
            self._abilities.clear()
        self._abilities[name] = (d.version, abilities)
        return abilities

    def route(self, name: str, key: bytes, prefix: bool = True
              ) -> tuple[list[Target], int, str]:
        """The nodes to try for a request to deployment `name` with routing `key`, in order,
        the load cap each try but the last carries, and the owner's node id (Router.plan);
        `prefix`: a generative request, routed by its prefix's assignment. Peers this node
        failed to connect to are left out and suspects tried last (PeerView.usable).
        ModelNotFound, or ModelUnavailable (or ModelFailed) when no replica is ready."""
        self._get(name)
        local = self.replicas.get(name)
        if local is None or local.state != "ready":  # peers only: their gossiped view as is
            peers = self.peers.routing(name)
            if peers.sole is not None:  # nothing to choose (no cap: there is no next try)
                return [peers.sole], 0, peers.sole.node_id
            if peers.targets:
                plan = self.router.plan(name, key, peers.loads, peers.ledgers if prefix else None)
                order = [peers.targets[n] for n in plan.order]
                return self.peers.usable(order, peers.suspects), plan.cap, plan.owner
        holders, local, suspects = self._holders(name)
        if not holders:
            if local is not None:
                local.session()  # raises ModelFailed / ModelUnavailable saying why
            view = self.view(name)
            why = view.message or "its replica is still loading"
            raise ModelUnavailable(f"model {name!r} has no ready replica: {why}; retry shortly")
        ledgers = {n: h[2] for n, h in holders.items()} if prefix else None
        plan = self.router.plan(name, key, {n: h[1] for n, h in holders.items()}, ledgers,
                                self.node_id if self.node_id in holders else None)
        order = [holders[n][0] for n in plan.order]
        return self.peers.usable(order, suspects), plan.cap, plan.owner

    def _holders(self, name: str) -> tuple[dict[str, tuple[Target, int, bytes]], Replica | None,
                                           frozenset[str]]:
        """Ready holders of `name` (node id -> Target, load, packed prefixes); our replica;
        the peers among them that routing tries last (PeerView.holders)."""
        peers, suspects = self.peers.holders(name)
        holders, local = dict(peers), self.replicas.get(name)
        if local is not None and local.state == "ready":
            ours = self.peers.own_prefixes(name, self.prefixes.packed(name))  # as others see
            holders[self.node_id] = (Target(self.node_id, self.name, "", True),
                                     local.in_flight, ours)
        return holders, local, suspects

    def serve(self, name: str, key: bytes, prefix: bool, cap: int | None = None,
              spill: bool = False) -> Replica:
        """Our replica of `name`, taking a request with routing `key` now (the caller counts
        it in flight before it next awaits). `cap`: the forwarder's load cap; ReplicaBusy
        when the replica already holds that many. `prefix`: a generative request, whose
        prefix the replica records when Router.claims says so, unless it is a `spill`."""
        replica = self.replica(name)
        if cap is not None and replica.in_flight >= cap:
            raise ReplicaBusy(f"the replica of {name!r} on node {self.name!r} holds "
                              f"{replica.in_flight} requests, the forwarder's cap of {cap}; "
                              "it tries another replica")
        if prefix and not spill:
            ledgers = {n: h[2] for n, h in self._holders(name)[0].items()}
            if self.router.claims(name, key, self.node_id, ledgers):
                self.prefixes.record(name, key)
        return replica

    def replica(self, name: str) -> Replica:
        """This node's replica of `name`, or one that moved and still runs (a peer whose view
        is a moment old may still send it requests); ModelNotFound if there is no such
        deployment, ModelUnavailable if this node runs none."""
        self._get(name)
        replica = self.replicas.get(name) or self.retiring.get(name)
        if replica is None:
            raise ModelUnavailable(f"model {name!r} has no replica on node {self.name!r}")
        return replica

    async def wait_ready(self, name: str, timeout: float | None = None) -> str:
        with contextlib.suppress(KeyError):
            return await self.replicas[name].wait_ready(timeout)
        return "missing"
