"""The supervisor, driven by small stand-in processes (no model needed)."""

import sys
from pathlib import Path

from meshnode.engines import EngineLaunch, EngineProcess, EngineState, SupervisorConfig
from meshnode.engines.servers import Command

FAST = SupervisorConfig(start_timeout_s=20, health_poll_s=0.02, backoff_s=0.01,
                        backoff_max_s=0.05, start_failures_max=3, stop_grace_s=2)
LAUNCH = EngineLaunch(engine="llama.cpp", model_path="/x", served_name="m")

SERVER = """
import asyncio, sys
from aiohttp import web
async def health(r): return web.json_response({"status": "ready"})
app = web.Application(); app.router.add_get("/health", health)
web.run_app(app, path=sys.argv[1], print=None)
"""


async def test_process_that_never_starts_is_failed_with_reason(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('weights are corrupt'); sys.exit(3)"]
    async with EngineProcess(LAUNCH, tmp_path, tmp_path / "log", FAST,
                             command=Command(argv=argv)) as p:
        assert await p.wait_state(EngineState.FAILED, timeout=20) is EngineState.FAILED
        assert "weights are corrupt" in p.reason and "code 3" in p.reason
        assert p.restarts == 2


async def test_ready_then_crash_restarts_then_close_twice(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    p = EngineProcess(LAUNCH, tmp_path, tmp_path / "log", FAST, socket_path=sock,
                      command=Command(argv=[sys.executable, "-c", SERVER, sock]))
    async with p:
        await p.wait_state(EngineState.READY, timeout=20)
        first = p.pid
        assert first is not None
        import os
        import signal
        os.kill(first, signal.SIGKILL)
        await p.wait_state(EngineState.RESTARTING, timeout=10)
        await p.wait_state(EngineState.READY, timeout=20)
        assert p.pid != first and p.restarts == 1
    assert p.state is EngineState.STOPPED
    await p.close()
    assert not Path(sock).exists()


def test_two_engines_of_one_model_get_their_own_sockets(tmp_path: Path) -> None:
    """A replica that moved away may still be closing (and then removes its socket) when a
    new one of the same model starts on the node: their paths must differ."""
    first = EngineProcess(LAUNCH, tmp_path, tmp_path / "log", FAST)
    second = EngineProcess(LAUNCH, tmp_path, tmp_path / "log", FAST)
    assert first.socket_path != second.socket_path
    assert all(Path(p).parent == tmp_path and Path(p).name.startswith("m.")
               for p in (first.socket_path, second.socket_path))
