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

from collections.abc import Sequence

import msgspec

from .errors import InvalidRequest
from .launch import EngineLaunch

__all__ = ["Command", "EXTERNAL", "SERVER_ENGINES", "check_engine_args", "command_for"]

# Engines that run their own server: name -> (module, function(launch, socket_path) -> Command)
EXTERNAL = {
    "vllm": ("meshnode.engines.vllm", "server_command"),
    "sglang": ("meshnode.engines.sglang", "server_command"),
}
SERVER_ENGINES = tuple(EXTERNAL)
"""Engines that run their own OpenAI server: it judges each request (and offers what our
engine host does not: logprobs, tools, n > 1, ...) and takes its own command-line options."""


def check_engine_args(engine: str, args: Sequence[str]) -> None:
    """InvalidRequest (param engine_args) unless `args` can be added to `engine`'s server
    command line: only vLLM and SGLang run a server of their own (the other engines run in
    meshnode's engine host, whose options are the launch's fields), and no argument may
    give an option the node sets itself (the adapter's RESERVED). `--flag value`,
    `--flag=value`, `--flag_name` (both servers accept underscores) and an abbreviation
    (argparse takes any unambiguous prefix) all count."""
    if not args:
        return
    if engine not in EXTERNAL:
        raise InvalidRequest(
            f"engine arguments go on the command line of the vllm and sglang servers; the "
            f"{engine} engine runs inside meshnode and takes none: remove them, or launch "
            "with --engine vllm or sglang", param="engine_args")
    reserved: dict[str, str] = importlib.import_module(EXTERNAL[engine][0]).RESERVED
    for arg in args:
        if "\0" in arg:
            raise InvalidRequest("an engine argument holds a NUL character",
                                 param="engine_args")
        if not arg.startswith("--") or len(arg) < 4:
            continue  # a value, or a short option (-tp 2, -q awq): none is reserved
        option = arg.split("=", 1)[0].replace("_", "-")
        for flag, instead in reserved.items():
            if flag.startswith(option):
                raise InvalidRequest(
                    f"engine argument {arg[:200]!r} gives {flag}, which meshnode sets on the "
                    f"{engine} server itself: {instead}", param="engine_args")


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
