"""SGLang: its own OpenAI server on a loopback port, started through the launcher.

    PY -c BOOTSTRAP external.py ... -- PY -m sglang.launch_server --model-path DIR
        --served-model-name NAME --host 127.0.0.1 --port P ...

SGLang's HTTP server listens only on TCP (its ServerArgs has --host/--port and no Unix socket
option), so the Command carries `base_url` and the node reaches it on 127.0.0.1:P, a free port
picked here. It needs CUDA: CUDA_VISIBLE_DEVICES from `devices` (tensor parallel over all of
them), --mem-fraction-static `memory_fraction` (weights and KV cache pool).

Readiness: GET /health answers 503 while the server starts (model load, then its own warm-up
request) and 200 once it serves; with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=1 it would also
generate a token. GET /health_generate always runs a one-token generation through the
scheduler (skipped when requests are already running), so it tells a wedged scheduler or GPU
from a live HTTP server: the probe for liveness of a running server, too costly to poll at
start-up every 50 ms.
"""

from __future__ import annotations

import os
import socket
import sys

from .external import REACH, launcher_argv, private_tmp_dir, template_file
from .launch import EngineLaunch
from .servers import Command

__all__ = ["RESERVED", "free_port", "server_command"]

RESERVED = {
    "--model-path": "give the model to launch",  # and its alias --model, a prefix of it
    "--served-model-name": "give --name", "--host": REACH, "--port": REACH,
    "--api-key": REACH, "--ssl-keyfile": REACH, "--ssl-certfile": REACH,
    "--context-length": "give --context-length", "--chat-template": "give --chat-template",
}
"""Options of SGLang's command line that server_command sets (or that no node-reached server
may take), and what to give instead: refused as engine arguments (check_engine_args)."""

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port free now. Another process may take it before SGLang binds it: the start then
    fails and the supervisor retries (on the same port; a new launch picks a new one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(launch: EngineLaunch, socket_path: str, port: int | None = None) -> Command:
    python = launch.python or sys.executable
    port = port or free_port()
    tmp_dir = private_tmp_dir(socket_path)
    argv = [*launcher_argv(python, tmp_dir),
            python, "-m", "sglang.launch_server",
            "--model-path", launch.model_path,
            "--served-model-name", launch.served_name,
            "--host", HOST, "--port", str(port),
            "--mem-fraction-static", str(launch.memory_fraction),
            "--context-length", str(launch.context_length)]
    env = {
        "TMPDIR": tmp_dir,       # its ZMQ IPC socket files (tempfile names)
        "HF_HUB_OFFLINE": "1",   # a local folder: never wait on the hub
    }
    if launch.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, launch.devices))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the indices nvidia-smi and placement use
        if len(launch.devices) > 1:
            argv += ["--tp-size", str(len(launch.devices))]
    if launch.chat_template:
        cache_dir = launch.cache_dir or os.path.dirname(socket_path)
        argv += ["--chat-template", template_file(launch.chat_template, cache_dir)]
    argv += launch.extra_args
    return Command(argv=argv, env=env, health_path="/health", cleanup=(tmp_dir,),
                   base_url=f"http://{HOST}:{port}")
