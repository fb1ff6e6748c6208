"""How each engine's process is started: our engine host, or the engine's own OpenAI server.

llama.cpp, transformers and MLX run inside `meshnode.engines.host`; vLLM and SGLang run their
own OpenAI-compatible servers (adapters in vllm.py and sglang.py build their command lines).
Either way the node reaches the process over HTTP on `socket_path` (or at `base_url`, for a
server that only listens on TCP) and polls `health_path` until it answers 200.
"""

from __future__ import annotations

import importlib
import os
import sys

import msgspec

from .launch import EngineLaunch

__all__ = ["Command", "EXTERNAL", "command_for"]

# Engines that run their own server: name -> (module, function(launch, socket_path) -> Command)
EXTERNAL = {
    "vllm": ("meshnode.engines.vllm", "server_command"),
    "sglang": ("meshnode.engines.sglang", "server_command"),
}


class Command(msgspec.Struct, frozen=True, kw_only=True):
    argv: list[str]
    env: dict[str, str] = {}
    """Added to (and overriding) the node's environment."""
    health_path: str = "/health"
    """GET here answers 200 once the engine serves."""
    cleanup: tuple[str, ...] = ()
    """Files or folders the engine leaves behind, removed when it stops."""
    base_url: str = ""
    """For a server that listens only on TCP (SGLang): "http://127.0.0.1:PORT", reached
    instead of the Unix socket. Empty: the Unix socket."""


def command_for(launch: EngineLaunch, socket_path: str, parent_pid: int | None = None) -> Command:
    external = EXTERNAL.get(launch.engine)
    if external is not None:
        module = importlib.import_module(external[0])
        return getattr(module, external[1])(launch, socket_path)
    env = {}
    if launch.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, launch.devices))
    return Command(argv=[launch.python or sys.executable, "-m", "meshnode.engines.host",
                         "--socket", socket_path,
                         "--parent-pid", str(parent_pid or os.getpid()),
                         "--launch", launch.to_json()], env=env)
