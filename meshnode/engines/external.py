"""Engines that run their own OpenAI server (vLLM, SGLang): the launcher that starts them.

The node starts such a server through this file, run by path in the engine's own venv:

    PY -c BOOTSTRAP .../external.py --parent-pid PID --tmp-dir DIR [--gguf-cache DIR
        --meshnode-root DIR] -- PY -m vllm.entrypoints.openai.api_server --model M ...

The launcher is the process-group leader the node supervises, and the server's parent:

1. It makes the server's private temp dir (TMPDIR, VLLM_RPC_BASE_PATH: ZMQ IPC sockets and
   scratch files land there; the supervisor removes the dir when the server stops).
2. With --gguf-cache, it converts the command's `--model FILE.gguf` once to a safetensors
   folder cached there (in a child process) and puts the folder in its place: vLLM needs one.
3. It runs the server and exits with its exit code; the supervisor then kills the group, so a
   server that died leaves none of its engine-core or worker processes behind.
4. When the node dies, however it dies, the kernel sends the launcher SIGHUP
   (PR_SET_PDEATHSIG) and it SIGKILLs its whole group. It stays for this: a kill -9 of vLLM's
   API server alone leaves its engine core and workers running, orphaned.

It imports only the standard library, and is run by path rather than with `-m`: the engine's
venv need not have meshnode installed (meshnode is found through --meshnode-root, only to
convert). The node-side helpers below build that command line.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

__all__ = ["REACH", "launcher_argv", "private_tmp_dir", "template_file"]

REACH = "the node sets it to reach the server"
"""Why an option of a server's command line is the node's own (an adapter's RESERVED)."""

# Runs this file as __main__ without putting its folder on sys.path (which would shadow
# `select`, `vllm` and `transformers` with this package's modules of the same name).
BOOTSTRAP = "import runpy, sys; sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"


# node side --------------------------------------------------------------------------------

def launcher_argv(python: str, tmp_dir: str, parent_pid: int | None = None,
                  gguf_cache: str | None = None) -> list[str]:
    """The launcher's part of a Command's argv; the server's own argv follows it."""
    argv = [python, "-c", BOOTSTRAP, os.path.abspath(__file__),
            "--parent-pid", str(parent_pid or os.getpid()), "--tmp-dir", tmp_dir]
    if gguf_cache is not None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        argv += ["--gguf-cache", gguf_cache, "--meshnode-root", root]
    return [*argv, "--"]


def private_tmp_dir(socket_path: str) -> str:
    """A per-server temp dir beside the socket. Short (a ZMQ IPC path must fit in 107 bytes,
    and vLLM appends a 36-character uuid), and unique per socket."""
    digest = hashlib.sha1(socket_path.encode()).hexdigest()[:10]
    return os.path.join(os.path.dirname(socket_path) or ".", f"tmp-{digest}")


def template_file(template: str, cache_dir: str) -> str:
    """Write a chat template once, named by its content, and return its path (`.jinja`: SGLang
    reads other suffixes as its own JSON template format)."""
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "chat-templates")
    path = os.path.join(folder, f"{digest}.jinja")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as f:
            f.write(template)
        os.replace(partial, path)
    return path


# engine side ------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """SIGHUP when the node dies, however it dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    else:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGHUP)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the node died before prctl took effect
        raise SystemExit(f"meshnode launcher: node {parent_pid} is gone")


def _convert_model(command: list[str], cache_dir: str, meshnode_root: str) -> list[str]:
    """The command with its `--model FILE.gguf` replaced by the converted folder. Converts in
    a child process, so that the launcher, which stays for the server's life, holds no torch."""
    try:
        i = command.index("--model") + 1
    except ValueError:
        return command
    if i >= len(command) or not command[i].endswith(".gguf"):
        return command
    # The folder's path comes back on stdout; the converter's own output goes to stderr (the
    # engine's log). meshnode is appended to sys.path: the venv's own packages come first.
    code = ("import os, sys; result = os.fdopen(os.dup(1), 'w'); os.dup2(2, 1); "
            "sys.path.append(sys.argv[1]); "
            "from meshnode.engines.convert import ensure_safetensors; "
            "result.write(ensure_safetensors(sys.argv[2], sys.argv[3]))")
    done = subprocess.run([sys.executable, "-c", code, meshnode_root, command[i], cache_dir],
                          check=False, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"meshnode launcher: could not convert {command[i]}")
    folder = done.stdout.strip()
    print(f"meshnode launcher: {command[i]} -> {folder}", file=sys.stderr, flush=True)
    return [*command[:i], folder, *command[i + 1:]]


def _kill_group(signum: int, frame: object) -> None:
    """The server, its engine core and workers, and us: the group we lead (the supervisor
    starts us in a session of our own); never a group we merely belong to."""
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    if _server is not None:
        _server.kill()
    os._exit(128 + signum)


_server: subprocess.Popen[bytes] | None = None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="meshnode-launcher")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--tmp-dir", required=True)
    parser.add_argument("--gguf-cache")
    parser.add_argument("--meshnode-root")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no server command after --")
    signal.signal(signal.SIGHUP, _kill_group)
    _die_with_parent(args.parent_pid)
    os.makedirs(args.tmp_dir, mode=0o700, exist_ok=True)
    if args.gguf_cache:
        command = _convert_model(command, args.gguf_cache, args.meshnode_root or "")
    # The supervisor stops the whole group (SIGTERM, then SIGKILL): the server gets it
    # directly; forwarding it too would be a second SIGTERM, which uvicorn takes as "exit now".
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    global _server
    _server = subprocess.Popen(command)
    code = _server.wait()
    raise SystemExit(128 - code if code < 0 else code)  # the supervisor then kills the group


if __name__ == "__main__":
    main()
