"""Supervision of one engine process: start, readiness, restart with backoff, stop.

An `EngineProcess` is an async context manager owning one child process (in its own process
group) and the task that watches it. States:

    starting -> ready -> restarting -> starting -> ...      (crash: restart after a backoff)
    starting -> failed                                      (start_failures_max starts in a row
                                                             never became ready)
    any      -> stopped                                     (close)

Backoff after the k-th crash in a row is min(backoff_max_s, backoff_s * 2**k); the count resets
once the process has stayed ready for `stable_s`. The child also kills itself if the node dies
(PR_SET_PDEATHSIG), so no engine outlives its node, even after a kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import shutil
import signal
import time
from collections import deque
from pathlib import Path

import aiohttp
import msgspec
import structlog

from .errors import EngineCrashed, EngineFailed, EngineUnavailable
from .launch import EngineLaunch
from .servers import Command, command_for

__all__ = ["EngineProcess", "EngineState", "SupervisorConfig"]

_instances = itertools.count(1)

log = structlog.get_logger("meshnode.engines")


class SupervisorConfig(msgspec.Struct, frozen=True, kw_only=True):
    start_timeout_s: float = 600.0
    """Longest a start may take to become ready (model load, conversion); then it is killed."""
    health_poll_s: float = 0.05
    """Interval between readiness polls while starting: lower is a faster ready, more wakeups."""
    backoff_s: float = 0.5
    """First restart delay after a crash; doubles per crash in a row."""
    backoff_max_s: float = 30.0
    """Cap on the restart delay."""
    stable_s: float = 60.0
    """Ready for this long resets the crash count (and so the backoff)."""
    start_failures_max: int = 3
    """Starts in a row that never became ready before the replica is marked failed."""
    stop_grace_s: float = 5.0
    """After SIGTERM, how long the process group gets before SIGKILL."""


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineProcess:
    def __init__(self, launch: EngineLaunch, run_dir: Path, log_path: Path,
                 config: SupervisorConfig | None = None, command: Command | None = None,
                 socket_path: str | None = None) -> None:
        self.launch = launch
        self.config = config or SupervisorConfig()
        # One path per process object: a replica that moved may still be closing (and then
        # removes its socket) while a new one of the same model starts on this node.
        self.socket_path = socket_path or str(
            run_dir / f"{launch.served_name}.{os.getpid()}.{next(_instances)}.sock")
        self.log_path = log_path
        self.command = command or command_for(launch, self.socket_path)
        self.base_url = self.command.base_url or "http://engine"
        """Prefix of the engine's URLs for `session`: its Unix socket, or its TCP address."""
        self.state = EngineState.STOPPED
        self.reason = ""
        self.info: dict[str, object] = {}
        self.restarts = 0
        self.pid: int | None = None
        self.ready_since: float | None = None
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "EngineProcess":
        if self._task is None:
            connector = (aiohttp.TCPConnector(limit=0) if self.command.base_url
                         else aiohttp.UnixConnector(path=self.socket_path, limit=0))
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
            await self._set(EngineState.STARTING)
            self._task = asyncio.create_task(self._supervise(), name=f"engine:{self.launch.served_name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the process group and the watcher; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._kill()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._remove_leftovers()
        await self._set(EngineState.STOPPED)

    # use -------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """A pooled client on the engine's socket; raises unless the engine is ready."""
        if self.state is EngineState.READY and self._session is not None:
            return self._session
        if self.state is EngineState.FAILED:
            raise EngineFailed(f"model {self.launch.served_name!r} failed to start", self.reason)
        raise EngineUnavailable(f"model {self.launch.served_name!r} is {self.state.value}")

    async def wait_state(self, *states: EngineState, timeout: float | None = None) -> EngineState:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: self.state in states)
        return self.state

    def crashed(self) -> EngineCrashed:
        return EngineCrashed(f"engine for {self.launch.served_name!r} dropped the request"
                             f" ({self.state.value})")

    # supervision -----------------------------------------------------------------------

    async def _set(self, state: EngineState, reason: str = "") -> None:
        if state is not self.state:
            log.info("engine.state", model=self.launch.served_name, state=state.value,
                     pid=self.pid, reason=reason or None)
        self.state, self.reason = state, reason
        self.ready_since = time.monotonic() if state is EngineState.READY else None
        async with self._changed:
            self._changed.notify_all()

    async def _supervise(self) -> None:
        crashes = 0  # in a row, for the backoff
        failed_starts = 0
        while True:
            ready = await self._start_once()
            if ready:
                failed_starts = 0
                assert self._proc is not None
                code = await self._proc.wait()
                stable = (time.monotonic() - (self.ready_since or 0.0)) >= self.config.stable_s
                crashes = 0 if stable else crashes + 1
                reason = f"exited with {self._describe(code)}"
            else:
                failed_starts += 1
                crashes += 1
                reason = self.reason
            await self._kill()  # the leader is gone: so goes its group (vLLM's engine core)
            if failed_starts >= self.config.start_failures_max:
                await self._set(EngineState.FAILED, reason)
                return
            self.restarts += 1
            delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** max(0, crashes - 1))
            await self._set(EngineState.RESTARTING, reason)
            log.warning("engine.restart", model=self.launch.served_name, reason=reason,
                        delay_s=delay, restarts=self.restarts)
            await asyncio.sleep(delay)

    async def _start_once(self) -> bool:
        """Spawn the process and wait until /health says ready; False if it never does."""
        await self._kill()
        await self._set(EngineState.STARTING)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        env = {**os.environ, **self.command.env}
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=env)
        self.pid = self._proc.pid
        deadline = time.monotonic() + self.config.start_timeout_s
        assert self._session is not None
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                self.reason = f"exited with {self._describe(self._proc.returncode)}: " \
                              f"{self.log_tail()}"
                return False
            try:
                async with self._session.get(self.base_url + self.command.health_path) as resp:
                    body = await resp.json(content_type=None) if resp.content_length else None
                    if resp.status == 200:
                        self.info = body if isinstance(body, dict) else {}
                        await self._set(EngineState.READY)
                        return True
                    if isinstance(body, dict) and body.get("status") == "failed":
                        self.reason = str(body.get("error"))
            except (aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(self.config.health_poll_s)
        self.reason = f"not ready after {self.config.start_timeout_s:.0f} s"
        await self._kill()
        return False

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is not None:
            # The leader died (a crash, a kill -9): its children (vLLM's engine core) may not.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.config.stop_grace_s):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # The group may hold grandchildren (vLLM workers): make sure none survive.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await _group_gone(proc.pid, self.config.stop_grace_s)

    def _remove_leftovers(self) -> None:
        for path in (self.socket_path, *self.command.cleanup):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                os.unlink(path)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _describe(code: int) -> str:
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 8192))
                tail = deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return " | ".join(line.strip() for line in tail if line.strip())


def _group_runs(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs; zombies (which hold no memory) aside,
    where /proc tells them apart."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def _group_gone(pgid: int, timeout_s: float) -> None:
    """Wait, at most `timeout_s`, until no process of group `pgid` runs. SIGKILL is delivered
    asynchronously: a dying vLLM worker holds its memory, GPU memory included, until the
    kernel has torn it down, and a replica started next on that GPU needs it back."""
    deadline = time.monotonic() + timeout_s
    while _group_runs(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
