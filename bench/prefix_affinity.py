"""Prefix affinity: prompt-cache hits and time to first token, ring routing vs round-robin.

Three real nodes on loopback, each holding one replica of two deployments of SmolLM2:

    aff   requests enter at the nodes in turn and the mesh routes them (ring keyed by the
          prompt's prefix, bounded loads)
    rr    requests go to the three holders in turn and are served there (round-robin: the
          hop header makes a node serve a request itself)

Both get the same seeded workload at the same time (same concurrency), so they share the
machine's noise. A workload is `--prompts` long system prompts, each followed by a short
user question, in random order. llama.cpp keeps one KV context per replica and reuses its
longest matching prefix; each answer reports it as usage.prompt_tokens_details.cached_tokens.

    hit rate   = sum(cached_tokens) / sum(prompt_tokens)
    ttft p50   = median time to the first streamed token
    max/mean   = the busiest replica's share of requests over the mean share

    python bench/prefix_affinity.py [--requests 60] [--prompts 3] [--concurrency 3]

Target (issue 4): hit rate >= 3.8x round-robin's, max/mean <= 1.25. With R replicas and a
uniform random workload over P prompts, round-robin hits about 1/P and affinity at best 1
(each replica one prompt when P <= R): the ratio cannot exceed R (here 3) in steady state,
whatever the router. The benchmark prints that bound next to the measured ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import NodeProcess, get_json

MODEL = "smollm2-135m-instruct"
TOPICS = ["astronomy", "cooking", "gardening", "chess", "sailing", "photography",
          "carpentry", "beekeeping", "cycling", "pottery"]
QUESTIONS = ["Where do I start?", "What should I buy first?", "What is a common mistake?",
             "How long does it take to learn?", "Is it expensive?", "Give me one tip.",
             "What is the history?", "Who is famous for it?", "Is it safe?",
             "What do experts disagree on?"]


def system_prompt(i: int) -> str:
    """Long and different from its first token, so prompts share no prefix but the template."""
    topic = TOPICS[i % len(TOPICS)]
    rules = " ".join(f"Rule {k}: when asked about {topic}, answer in at most {k + 2} short "
                     f"sentences and mention one {topic} fact." for k in range(12))
    return f"{topic.upper()} GUIDE {i}. You are an expert in {topic}. {rules}"


def workload(n: int, prompts: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for j in range(n):
        p = rng.randrange(prompts)
        out.append({"messages": [
            {"role": "system", "content": system_prompt(p)},
            {"role": "user", "content": f"{rng.choice(QUESTIONS)} (#{j})"}],
            "max_tokens": 2, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}})
    return out


async def one(session: aiohttp.ClientSession, url: str, body: dict,
              hop: bool) -> tuple[float, dict, str]:
    headers = {"X-Meshnode-Hop": "1"} if hop else {}
    start = time.perf_counter()
    ttft = None
    usage: dict = {}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        served = resp.headers["X-Served-By"]
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
    return (ttft if ttft is not None else time.perf_counter() - start) * 1000, usage, served


async def run(name: str, entries: list[str], hop: bool, reqs: list[dict],
              concurrency: int) -> dict:
    queue: asyncio.Queue[tuple[int, dict]] = asyncio.Queue()
    for i, body in enumerate(reqs):
        queue.put_nowait((i, {**body, "model": name}))
    ttfts: list[float] = []
    prompt = cached = 0
    served: Counter[str] = Counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal prompt, cached
        while not queue.empty():
            i, body = queue.get_nowait()
            ms, usage, by = await one(session, entries[i % len(entries)], body, hop)
            ttfts.append(ms)
            prompt += usage.get("prompt_tokens", 0)
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            served[by] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    mean = len(reqs) / 3
    return {"hit_rate": round(cached / prompt, 3) if prompt else 0.0,
            "ttft_p50_ms": round(statistics.median(ttfts), 1),
            "max_over_mean": round(max(served.values()) / mean, 2),
            "served": dict(served)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    env = {"MESHNODE_ENGINE_THREADS": "1"}  # six engines on this machine
    nodes: list[NodeProcess] = []
    try:
        nodes.append(NodeProcess(tmp / "a", "--name", "a", "--mesh-preset", "local",
                                 "--no-mdns", env=env))
        for n in ("b", "c"):
            nodes.append(NodeProcess(tmp / n, "--name", n, "--mesh-preset", "local",
                                     "--no-mdns", "--join", nodes[0].gossip, env=env))
        deadline = time.monotonic() + 30
        while len(get_json(nodes[0].url + "/v1/cluster/nodes")["data"]) < 3:
            assert time.monotonic() < deadline, "nodes did not join"
            time.sleep(0.2)
        for name in ("aff", "rr"):
            urllib.request.urlopen(urllib.request.Request(
                nodes[0].url + "/v1/deployments", method="POST",
                data=json.dumps({"model": MODEL, "name": name, "replicas": 3}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
        for n in nodes:
            n.wait_ready("aff", "rr", timeout_s=600)
        reqs = workload(args.requests, args.prompts, args.seed)
        urls = [n.url for n in nodes]
        print(f"seed {args.seed}: {args.requests} requests over {args.prompts} system prompts,"
              f" concurrency {args.concurrency} per router", file=sys.stderr)

        async def both() -> list[dict]:
            return await asyncio.gather(run("aff", urls, False, reqs, args.concurrency),
                                        run("rr", urls, True, reqs, args.concurrency))

        aff, rr = asyncio.run(both())
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = aff["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else float("inf")
    result = {"bench": "prefix_affinity", "requests": args.requests, "prompts": args.prompts,
              "concurrency": args.concurrency, "seed": args.seed, "affinity": aff,
              "round_robin": rr, "hit_rate_ratio": round(ratio, 2),
              "ttft_p50_ratio": round(aff["ttft_p50_ms"] / rr["ttft_p50_ms"], 2),
              "ratio_bound": min(3, args.prompts)}
    print(json.dumps(result))
    print(f"\n{'router':12} {'hit rate':>9} {'ttft p50 ms':>12} {'max/mean':>9}  served")
    for label, r in (("affinity", aff), ("round-robin", rr)):
        print(f"{label:12} {r['hit_rate']:>9} {r['ttft_p50_ms']:>12} {r['max_over_mean']:>9}"
              f"  {r['served']}")
    print(f"\nhit rate ratio {result['hit_rate_ratio']}x (target >= 3.8x; bound for this "
          f"workload {result['ratio_bound']}x), ttft ratio {result['ttft_p50_ratio']}x, "
          f"affinity max/mean {aff['max_over_mean']} (target <= 1.25)")


if __name__ == "__main__":
    main()
