"""vLLM and SGLang run their own servers: their command lines, environments, readiness and
clean-up, the launcher that starts them, and the supervisor's TCP variant (SGLang)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.engines import (
    EngineLaunch,
    EngineProcess,
    EngineState,
    InvalidRequest,
    SupervisorConfig,
    check_engine_args,
    sglang,
    vllm,
)
from meshnode.engines.external import launcher_argv, private_tmp_dir
from meshnode.engines.servers import Command, command_for

FAST = SupervisorConfig(start_timeout_s=20, health_poll_s=0.02, backoff_s=0.01,
                        backoff_max_s=0.05, start_failures_max=3, stop_grace_s=2)
PY = "/opt/vllm/bin/python"


def launch(tmp: Path, **kw: object) -> EngineLaunch:
    model = tmp / "model.gguf"
    if not model.exists():
        model.write_bytes(b"GGUF" + bytes(1000))
    fields = {"engine": "vllm", "model_path": str(model), "served_name": "smol",
              "context_length": 2048, "python": PY, "cache_dir": str(tmp / "converted"), **kw}
    return EngineLaunch(**fields)  # type: ignore[arg-type]


def server_part(argv: list[str]) -> list[str]:
    """The server's own argv: what follows the launcher's `--`."""
    return argv[argv.index("--") + 1:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# vLLM ---------------------------------------------------------------------------------------

def test_vllm_cpu_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    sock = str(tmp_path / "run" / "smol.1.sock")
    cmd = vllm.server_command(launch(tmp_path), sock, gpu=False)
    assert cmd.argv[:2] == [PY, "-c"]
    assert flag(cmd.argv, "--gguf-cache") == str(tmp_path / "converted")  # converted first
    server = server_part(cmd.argv)
    assert server[:3] == [PY, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(server, "--model") == str(tmp_path / "model.gguf")
    assert flag(server, "--served-model-name") == "smol"
    assert flag(server, "--uds") == sock
    assert flag(server, "--max-model-len") == "2048"
    assert "--enforce-eager" in server and "--gpu-memory-utilization" not in server
    assert "--chat-template" not in server
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env and "VLLM_CPU_OMP_THREADS_BIND" not in cmd.env
    tmp = private_tmp_dir(sock)
    assert cmd.env["TMPDIR"] == cmd.env["VLLM_RPC_BASE_PATH"] == tmp
    assert flag(cmd.argv, "--tmp-dir") == tmp and cmd.cleanup == (tmp,)
    assert os.path.dirname(tmp) == os.path.dirname(sock) and len(os.path.basename(tmp)) <= 16
    assert cmd.env["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "converted"))
    assert cmd.health_path == "/health" and cmd.base_url == ""
    assert int(flag(cmd.argv, "--parent-pid")) == os.getpid()


def test_vllm_kv_cache_size_from_weights_or_environment(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(int(2.5 * 2**30))  # sparse: 2.5 GiB of weights -> 3 GiB of KV cache
    cmd = vllm.server_command(launch(tmp_path, model_path=str(big)), str(tmp_path / "s"),
                              gpu=False)
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    cmd = vllm.server_command(launch(tmp_path), str(tmp_path / "s"), gpu=False)
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_vllm_cpu_threads_left_to_vllm(tmp_path: Path) -> None:
    cmd = vllm.server_command(launch(tmp_path, threads=2), str(tmp_path / "s"), gpu=False)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in cmd.env and "OMP_NUM_THREADS" not in cmd.env


def test_vllm_gpu_command(tmp_path: Path) -> None:
    cmd = vllm.server_command(launch(tmp_path, devices=(2, 3), memory_fraction=0.6),
                              str(tmp_path / "s"), gpu=True)
    server = server_part(cmd.argv)
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert cmd.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert flag(server, "--gpu-memory-utilization") == "0.6"
    assert flag(server, "--tensor-parallel-size") == "2"
    assert "--enforce-eager" not in server and "VLLM_CPU_KVCACHE_SPACE" not in cmd.env
    one = vllm.server_command(launch(tmp_path, devices=(1,)), str(tmp_path / "s"))
    assert one.env["CUDA_VISIBLE_DEVICES"] == "1"  # devices given: a GPU, no probing
    assert "--tensor-parallel-size" not in one.argv and "--gpu-memory-utilization" in one.argv


def test_vllm_folder_model_is_not_converted(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    cmd = vllm.server_command(launch(tmp_path, model_path=str(folder)), str(tmp_path / "s"),
                              gpu=False)
    assert "--gguf-cache" not in cmd.argv[:cmd.argv.index("--")]
    assert flag(server_part(cmd.argv), "--model") == str(folder)


def test_chat_template_file_and_extra_args(tmp_path: Path) -> None:
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    extra = ("--max-num-seqs", "8", "--seed", "1")
    a = vllm.server_command(launch(tmp_path, chat_template=template, extra_args=extra),
                            str(tmp_path / "s"), gpu=False)
    b = sglang.server_command(launch(tmp_path, engine="sglang", chat_template=template,
                                     extra_args=extra), str(tmp_path / "s"), port=9)
    for cmd in (a, b):
        path = flag(cmd.argv, "--chat-template")
        assert path.startswith(str(tmp_path / "converted")) and path.endswith(".jinja")
        assert Path(path).read_text() == template
        assert tuple(cmd.argv[-4:]) == extra  # last, so they can override ours
    assert flag(a.argv, "--chat-template") == flag(b.argv, "--chat-template")  # by content
    assert len(list((tmp_path / "converted" / "chat-templates").iterdir())) == 1


@pytest.mark.parametrize(("engine", "args", "says"), [
    ("vllm", ["--served-model-name", "x"], "gives --served-model-name"),
    ("vllm", ["--served_model_name=x"], "gives --served-model-name"),  # underscores, =
    ("vllm", ["--port=9"], "gives --port"),
    ("vllm", ["--uds"], "gives --uds"),
    ("vllm", ["--max-model", "4096"], "give --context-length"),  # an abbreviation
    ("vllm", ["--chat-template", "t.jinja"], "give --chat-template"),
    ("sglang", ["--model", "other"], "gives --model"),
    ("sglang", ["--context-length", "9"], "give --context-length"),
    ("vllm", ["--dtype", "a\0b"], "NUL"),
    ("llama.cpp", ["--n-batch", "8"], "the llama.cpp engine runs inside meshnode"),
    ("transformers", ["x"], "the transformers engine runs inside meshnode"),
])
def test_engine_arguments_that_would_cut_the_node_off_are_refused(
        engine: str, args: list[str], says: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)) as caught:
        check_engine_args(engine, args)
    assert caught.value.param == "engine_args"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_arguments_of_the_servers_own_pass(engine: str) -> None:
    check_engine_args(engine, ["--max-num-seqs", "8", "--dtype=float16", "-tp", "2",
                               "--model-impl", "vllm", "--chat-template-content-format",
                               "string", "--max-num-batched-tokens", "4096"])
    check_engine_args("llama.cpp", [])  # nothing to pass is fine anywhere


def test_command_for_dispatches_to_the_adapters(tmp_path: Path) -> None:
    cmd = command_for(launch(tmp_path), str(tmp_path / "s"))
    assert "vllm.entrypoints.openai.api_server" in cmd.argv
    cmd = command_for(launch(tmp_path, engine="sglang"), str(tmp_path / "s"))
    assert "sglang.launch_server" in cmd.argv and cmd.base_url.startswith("http://127.0.0.1:")


# SGLang -------------------------------------------------------------------------------------

def test_sglang_command(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    sock = str(tmp_path / "run" / "m.1.sock")
    cmd = sglang.server_command(
        launch(tmp_path, engine="sglang", model_path=str(folder), devices=(0, 1),
               memory_fraction=0.7, context_length=4096), sock, port=31234)
    server = server_part(cmd.argv)
    assert server[:3] == [PY, "-m", "sglang.launch_server"]
    assert flag(server, "--model-path") == str(folder)
    assert flag(server, "--served-model-name") == "smol"
    assert (flag(server, "--host"), flag(server, "--port")) == ("127.0.0.1", "31234")
    assert flag(server, "--mem-fraction-static") == "0.7"
    assert flag(server, "--context-length") == "4096"
    assert flag(server, "--tp-size") == "2"
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert cmd.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert cmd.base_url == "http://127.0.0.1:31234" and cmd.health_path == "/health"
    assert cmd.env["TMPDIR"] == private_tmp_dir(sock) and cmd.cleanup == (private_tmp_dir(sock),)
    assert "--gguf-cache" not in cmd.argv


def test_sglang_picks_a_free_port(tmp_path: Path) -> None:
    cmd = sglang.server_command(launch(tmp_path, engine="sglang"), str(tmp_path / "s"))
    port = int(flag(server_part(cmd.argv), "--port"))
    assert 0 < port < 65536 and cmd.base_url == f"http://127.0.0.1:{port}"


# SGLang's readiness: 503 during load and warm-up, then 200; on TCP, not a Unix socket.
WARMING = """
import sys, time
from aiohttp import web
started = time.monotonic()
async def health(r):
    return web.Response(status=200 if time.monotonic() - started > 0.5 else 503)
async def chat(r): return web.json_response({"ok": True})
app = web.Application()
app.router.add_get("/health", health); app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


async def test_tcp_engine_is_ready_only_after_its_health_says_200(tmp_path: Path) -> None:
    port = sglang.free_port()
    command = Command(argv=[sys.executable, "-c", WARMING, str(port)],
                      base_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    async with EngineProcess(launch(tmp_path, engine="sglang"), tmp_path, tmp_path / "log",
                             FAST, command=command) as p:
        assert await p.wait_state(EngineState.READY, EngineState.FAILED,
                                  timeout=20) is EngineState.READY
        assert time.monotonic() - started >= 0.5
        assert p.base_url == f"http://127.0.0.1:{port}"
        async with p.session.post(p.base_url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 200 and await resp.json() == {"ok": True}


# The supervisor: a dead leader's children (vLLM's engine core) do not outlive it.
FORKING = """
import subprocess, sys
from aiohttp import web
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
async def health(r): return web.Response()
app = web.Application(); app.router.add_get("/health", health)
web.run_app(app, path=sys.argv[1], print=None)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def test_killed_leader_takes_its_group_along(tmp_path: Path) -> None:
    sock, child_file = str(tmp_path / "s.sock"), tmp_path / "child"
    command = Command(argv=[sys.executable, "-c", FORKING, sock, str(child_file)],
                      cleanup=(str(tmp_path / "leftover"),))
    async with EngineProcess(launch(tmp_path), tmp_path, tmp_path / "log", FAST,
                             command=command, socket_path=sock) as p:
        await p.wait_state(EngineState.READY, timeout=20)
        first, child = p.pid, int(child_file.read_text())
        assert first is not None and alive(child)
        os.kill(first, signal.SIGKILL)
        await p.wait_state(EngineState.RESTARTING, timeout=10)
        await p.wait_state(EngineState.READY, timeout=20)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not alive(child)
        second = int(child_file.read_text())
        (tmp_path / "leftover").mkdir()
    assert not alive(second)
    assert not Path(sock).exists() and not (tmp_path / "leftover").exists()


# The launcher, run for real with a stand-in server --------------------------------------------

PROBE = "import os, sys; print(os.getppid(), os.path.isdir(sys.argv[1]), flush=True)"


def test_launcher_makes_the_tmp_dir_and_runs_the_server(tmp_path: Path) -> None:
    tmp = str(tmp_path / "tmp-x")
    argv = [*launcher_argv(sys.executable, tmp), sys.executable, "-c", PROBE, tmp]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent)  # a cwd full of modules: no shadowing
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    parent, made = out.split()
    assert int(parent) == proc.pid  # the launcher is the server's parent, and waits for it
    assert made == "True" and os.stat(tmp).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("code, expected", [("sys.exit(3)", 3),
                                            ("os.kill(os.getpid(), 9)", 128 + 9)])
def test_launcher_exits_with_the_servers_code(tmp_path: Path, code: str, expected: int) -> None:
    argv = [*launcher_argv(sys.executable, str(tmp_path / "t")),
            sys.executable, "-c", f"import os, sys; {code}"]
    assert subprocess.run(argv, check=False, timeout=30).returncode == expected


SERVER_WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(f"{child.pid}")
time.sleep(600)
"""


def test_launcher_takes_server_and_workers_along_when_the_node_dies(tmp_path: Path) -> None:
    """The node (a stand-in parent) is killed -9: the server and its child die too."""
    pids = tmp_path / "pids"
    server = [*launcher_argv(sys.executable, str(tmp_path / "t"), parent_pid=0),
              sys.executable, "-c", SERVER_WITH_CHILD, str(pids)]
    node = ("import os, subprocess, sys, time\n"
            f"argv = {server!r}\n"
            "argv[argv.index('--parent-pid') + 1] = str(os.getpid())\n"
            "p = subprocess.Popen(argv, start_new_session=True)\n"
            "print(p.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", node], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        launcher = int(parent.stdout.readline())
        deadline = time.monotonic() + 20
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        worker = int(pids.read_text())
        assert alive(launcher) and alive(worker)
        parent.kill()
        parent.wait()
        while (alive(launcher) or alive(worker)) and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert not alive(launcher) and not alive(worker)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout:
            parent.stdout.close()


def test_launcher_refuses_when_its_node_is_gone(tmp_path: Path) -> None:
    argv = [*launcher_argv(sys.executable, str(tmp_path / "t"), parent_pid=1),
            sys.executable, "-c", "print('started')"]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert "is gone" in proc.stderr


def test_launcher_without_gguf_leaves_the_model_alone(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    argv = [*launcher_argv(sys.executable, str(tmp_path / "t"), gguf_cache=str(tmp_path)),
            sys.executable, "-c", "import sys; print(sys.argv[2])", "--model", str(folder)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(folder)
