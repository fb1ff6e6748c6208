"""A model replica on this node: locate the weights, then supervise its engine process.

States: preparing (finding/assembling weights) -> the engine's own states (starting, ready,
restarting, failed, stopped). Preparing errors (package missing, file gone) mark it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import msgspec
import structlog

from meshnode.engines import EngineLaunch, EngineProcess, EngineState, SupervisorConfig

from .catalogue import ModelSpec, locate
from .deployments import Deployment
from .errors import ModelFailed, ModelUnavailable, NodeError

__all__ = ["Replica", "ReplicaStatus"]

log = structlog.get_logger("meshnode.node")


class ReplicaStatus(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    state: str
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    since: float = 0.0
    """Unix time of the last state change."""
    gpu: int | None = None
    """The GPU index it runs on (vLLM, SGLang on a node with GPUs); shown by its own node."""


class Replica:
    def __init__(self, deployment: Deployment, spec: ModelSpec, *, node_name: str,
                 data_dir: Path, run_dir: Path, threads: int,
                 supervisor: SupervisorConfig, python: str = "",
                 prompt_cache_mb: int = 256, gpu: int | None = None) -> None:
        self.deployment = deployment
        self.gpu = gpu
        """The GPU index the engine runs on (placement gave it one: vLLM, SGLang), or None."""
        self.spec = spec
        self._node_name = node_name
        self._data_dir = data_dir
        self._run_dir = run_dir
        self._threads = threads
        self._supervisor = supervisor
        self._python = python
        self._prompt_cache_mb = prompt_cache_mb
        self.process: EngineProcess | None = None
        self._state = "preparing"
        self._reason = ""
        self._since = time.time()
        self._task: asyncio.Task[None] | None = None
        self.in_flight = 0

    async def __aenter__(self) -> "Replica":
        if self._task is None:
            self._task = asyncio.create_task(self._prepare(), name=f"replica:{self.deployment.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the engine; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.process is not None:
            await self.process.close()
        self._state = "stopped"

    async def _prepare(self) -> None:
        try:
            path = await asyncio.to_thread(locate, self.spec, self._data_dir)
        except (NodeError, OSError, ValueError) as exc:
            self._state, self._reason, self._since = "failed", str(exc), time.time()
            log.error("replica.failed", model=self.deployment.name, reason=str(exc))
            return
        d = self.deployment
        launch = EngineLaunch(
            engine=d.engine, model_path=str(path), served_name=d.name,
            context_length=d.context_length, abilities=self.abilities,
            chat_template=d.chat_template, threads=self._threads, python=self._python,
            cache_dir=str(self._data_dir / "converted"),
            prompt_cache_mb=self._prompt_cache_mb,
            devices=() if self.gpu is None else (self.gpu,),
            extra_args=d.engine_args,
        )
        self.process = EngineProcess(
            launch, run_dir=self._run_dir,
            log_path=self._data_dir / "logs" / f"{d.name}.log", config=self._supervisor)
        await self.process.__aenter__()

    def outdated(self, d: Deployment | None) -> bool:
        """Whether this replica must go, `d` being its deployment now (None: stopped): stopped,
        changed in what the engine runs (Deployment.shape), or failed under an older version
        (a scale or an update lets the node try again)."""
        return d is None or d.shape != self.deployment.shape or (
            self.state == "failed" and d.version != self.deployment.version)

    @property
    def abilities(self) -> tuple[str, ...]:
        abilities = tuple(self.spec.abilities)
        if self.deployment.chat_template and "chat" not in abilities:
            abilities += ("chat",)
        return abilities

    @property
    def state(self) -> str:
        return self.process.state.value if self.process is not None else self._state

    def status(self) -> ReplicaStatus:
        p = self.process
        if p is None:
            return ReplicaStatus(node=self._node_name, state=self._state, reason=self._reason,
                                 since=self._since, gpu=self.gpu)
        return ReplicaStatus(node=self._node_name, state=p.state.value, reason=p.reason,
                             pid=p.pid, restarts=p.restarts, since=self._since, gpu=self.gpu)

    @property
    def base_url(self) -> str:
        """Prefix of the engine's URLs for `session()` (its Unix socket or TCP address)."""
        return self.process.base_url if self.process is not None else "http://engine"

    def address(self) -> str:
        """Where the engine's OpenAI server answers: `unix:/path` or `http://host:port`; or
        ModelUnavailable/ModelFailed saying why it does not."""
        self.session()  # raises unless ready
        assert self.process is not None
        return self.process.command.base_url or f"unix:{self.process.socket_path}"

    def session(self) -> aiohttp.ClientSession:
        """The engine's client session, or ModelUnavailable/ModelFailed saying why not."""
        p = self.process
        name = self.deployment.name
        if p is not None and p.state is EngineState.READY:
            return p.session
        if self.state == "failed":
            reason = p.reason if p is not None else self._reason
            raise ModelFailed(f"model {name!r} failed to load: {reason}", reason)
        raise ModelUnavailable(f"model {name!r} is {self.state}; retry shortly")

    async def wait_ready(self, timeout: float | None = None) -> str:
        async with asyncio.timeout(timeout):
            while self.process is None:
                if self._state == "failed":
                    return self._state
                await asyncio.sleep(0.05)
        await self.process.wait_state(EngineState.READY, EngineState.FAILED, timeout=timeout)
        return self.state
