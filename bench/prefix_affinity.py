"""Prefix affinity: prompt-cache hits and time to first token, ring routing vs round-robin.

`--replicas` real nodes on loopback (default 3), each holding one replica of two
deployments of SmolLM2:

    aff   requests enter at the nodes in turn and the mesh routes them (each prompt prefix
          assigned to a replica from the gossiped prefix ledgers, bounded loads)
    rr    requests go to the three holders in turn and are served there (round-robin: the
          hop header makes a node serve a request itself)

Both get the same seeded workload at the same time (same concurrency), so they share the
machine's noise. Two workloads:

    --turns 1  (single-turn) `--requests` independent requests: one of `--prompts` long
               system prompts and a short user question, in random order, `--concurrency`
               in flight per router.
    --turns T  (multi-turn) `--conversations` chats, each opening with one of the system
               prompts and a first question; every later turn appends the assistant's actual
               answer (up to `--answer-tokens`) and a new question. A chat's turns are
               sequential; `--concurrency` chats run at once per router. The routing key
               (system prompt + first user message, first 256 bytes) is the same for every
               turn, so the ring keeps a chat on one replica; round-robin sends each request
               to the next holder in turn. With the long system prompts the key is the
               system prompt alone (all its chats on one replica); `--system-rules 0` makes
               them short, so the first question spreads chats over the replicas.

llama.cpp reuses the longest matching prefix of the context's live tokens or, with the
multi-prefix prompt cache (`--prompt-cache-mb` on the nodes, default 256; 0 = off), of any
saved state; each answer reports it as usage.prompt_tokens_details.cached_tokens.

    hit rate   = sum(cached_tokens) / sum(prompt_tokens)
    ttft p50   = median time to the first streamed token
    max/mean   = the busiest replica's share of requests over the mean share
    switches   = requests served by another replica than the last one that served their
                 system prompt (a prefix that moved, or spilled under the load bound)

    python bench/prefix_affinity.py [--requests 60] [--prompts 3] [--concurrency 3]
    python bench/prefix_affinity.py --turns 4 [--conversations 9] [--answer-tokens 24]
    python bench/prefix_affinity.py --turns 6 --conversations 8 --concurrency 4 \
        --answer-tokens 32 --system-rules 0                   # short system prompts
    python bench/prefix_affinity.py ... --prompt-cache-mb 0     # the nodes' cache off
    python bench/prefix_affinity.py --replicas 5 --prompts 5 --prompt-cache-mb 0
    python bench/prefix_affinity.py --turns 6 --conversations 12 --concurrency 4 \
        --answer-tokens 64 --prompt-cache-mb 0      # longer chats: history counts most

Target (issue 4): hit rate >= 3.8x round-robin's, max/mean <= 1.25. Single-turn: with R
replicas and a uniform random workload over P prompts, round-robin hits about 1/P and
affinity at best 1 (each replica one prompt when P <= R); with K-entry caches round-robin
hits K/P and affinity needs K >= P/R: the ratio cannot exceed R (`--replicas`) in steady state,
whatever the router or the cache. The benchmark prints that bound next to the measured ratio.
Multi-turn: with the prompt cache, a round-robin replica still finds the system prompt in
some saved state (any chat under it), so only the chat history separates the routers; without
it, round-robin finds a chat's history where it sent the previous turn, about 1 time in R, so
the ratio again tends to R at most (bench/affinity_model.py models it at other R).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
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


def system_prompt(i: int, rules_n: int = 12) -> str:
    """Different from its first token, so prompts share no prefix but the template; about
    30 tokens plus 33 per rule (12 rules: ~420 tokens)."""
    topic = TOPICS[i % len(TOPICS)]
    rules = " ".join(f"Rule {k}: when asked about {topic}, answer in at most {k + 2} short "
                     f"sentences and mention one {topic} fact." for k in range(rules_n))
    return f"{topic.upper()} GUIDE {i}. You are an expert in {topic}. {rules}".rstrip()


def conversations(n: int, prompts: int, turns: int, seed: int,
                  rules_n: int = 12) -> list[tuple[str, list[str]]]:
    """(system prompt, questions) per chat: chat c uses prompt c % prompts."""
    rng = random.Random(seed)
    return [(system_prompt(c % prompts, rules_n),
             [f"{rng.choice(QUESTIONS)} (chat {c}, turn {t})" for t in range(turns)])
            for c in range(n)]


def workload(n: int, prompts: int, seed: int, rules_n: int = 12) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for j in range(n):
        p = rng.randrange(prompts)
        out.append({"messages": [
            {"role": "system", "content": system_prompt(p, rules_n)},
            {"role": "user", "content": f"{rng.choice(QUESTIONS)} (#{j})"}],
            "max_tokens": 2, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}})
    return out


async def one(session: aiohttp.ClientSession, url: str, body: dict,
              hop: bool) -> tuple[float, dict, str, str]:
    """(ttft ms, usage, serving node, answer text) of one streamed chat request."""
    headers = {"X-Meshnode-Hop": "1"} if hop else {}
    start = time.perf_counter()
    ttft = None
    usage: dict = {}
    text: list[str] = []
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        served = resp.headers["X-Served-By"]
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            for choice in event.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or "")
            if event.get("usage"):
                usage = event["usage"]
    return ((ttft if ttft is not None else time.perf_counter() - start) * 1000, usage, served,
            "".join(text))


class Tally:
    """One router's measurements; `entry()` gives the node the next request enters at (in
    turn: round-robin over the holders for `rr`, over the entry nodes for `aff`)."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries
        self.replicas = len(entries)
        self.sent = 0
        self.ttfts: list[float] = []
        self.prompt = self.cached = 0
        self.served: Counter[str] = Counter()
        self.by_turn: dict[int, list[int]] = {}  # turn -> [cached, prompt] tokens
        self.last_by: dict[str, str] = {}  # system prompt -> the replica that served it last
        self.switches = 0  # requests served elsewhere than their system prompt's last one
        self.by_prompt: dict[str, Counter[str]] = {}  # system prompt's title -> served by

    def entry(self) -> str:
        self.sent += 1
        return self.entries[(self.sent - 1) % len(self.entries)]

    def add(self, ms: float, usage: dict, by: str, system: str, turn: int = 0) -> None:
        if self.last_by.setdefault(system, by) != by:
            self.switches += 1
            self.last_by[system] = by
        self.by_prompt.setdefault(system.split(".")[0], Counter())[by] += 1
        prompt = usage.get("prompt_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        self.ttfts.append(ms)
        self.prompt += prompt
        self.cached += cached
        self.served[by] += 1
        counts = self.by_turn.setdefault(turn, [0, 0])
        counts[0] += cached
        counts[1] += prompt

    def summary(self) -> dict:
        mean = len(self.ttfts) / self.replicas
        return {"hit_rate": round(self.cached / self.prompt, 3) if self.prompt else 0.0,
                "ttft_p50_ms": round(statistics.median(self.ttfts), 1),
                "max_over_mean": round(max(self.served.values()) / mean, 2),
                "served": dict(self.served), "switches": self.switches,
                "served_by_prompt": {k: dict(v) for k, v in sorted(self.by_prompt.items())},
                "hit_rate_by_turn": [round(c / p, 3) if p else 0.0
                                     for _, (c, p) in sorted(self.by_turn.items())]}


async def run(name: str, entries: list[str], hop: bool, reqs: list[dict],
              concurrency: int) -> dict:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in reqs:
        queue.put_nowait({**body, "model": name})
    tally = Tally(entries)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            ms, usage, by, _ = await one(session, tally.entry(), body, hop)
            tally.add(ms, usage, by, body["messages"][0]["content"])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return tally.summary()


async def run_chats(name: str, entries: list[str], hop: bool,
                    chats: list[tuple[str, list[str]]], answer_tokens: int,
                    concurrency: int) -> dict:
    """Each chat's turns in order, each turn carrying the earlier answers; `concurrency`
    chats at once."""
    queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
    for chat in chats:
        queue.put_nowait(chat)
    tally = Tally(entries)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            system, questions = queue.get_nowait()
            messages = [{"role": "system", "content": system}]
            for turn, question in enumerate(questions):
                messages.append({"role": "user", "content": question})
                body = {"model": name, "messages": list(messages), "max_tokens": answer_tokens,
                        "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}}
                ms, usage, by, answer = await one(session, tally.entry(), body, hop)
                tally.add(ms, usage, by, system, turn)
                messages.append({"role": "assistant", "content": answer})

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return tally.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3,
                        help="nodes, each holding one replica of both deployments")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--turns", type=int, default=1,
                        help="1 = single-turn requests; T > 1 = chats of T turns")
    parser.add_argument("--conversations", type=int, default=9, help="chats (turns > 1)")
    parser.add_argument("--answer-tokens", type=int, default=24,
                        help="max_tokens of each answer in a chat (turns > 1)")
    parser.add_argument("--system-rules", type=int, default=12,
                        help="length of the system prompts, in rules of ~33 tokens (0: short)")
    parser.add_argument("--prompt-cache-mb", type=int, default=None,
                        help="the nodes' --prompt-cache-mb (default: theirs, 256; 0 = off)")
    args = parser.parse_args()
    if min(args.turns, args.conversations, args.answer_tokens, args.requests,
           args.prompts, args.concurrency, args.replicas) < 1:
        parser.error("--turns, --conversations, --answer-tokens, --requests, --prompts, "
                     "--concurrency and --replicas must be >= 1")
    if args.system_rules < 0:
        parser.error("--system-rules must be >= 0")
    if args.prompt_cache_mb is not None and args.prompt_cache_mb < 0:
        parser.error("--prompt-cache-mb must be >= 0 (0 turns the cache off)")
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    env = {"MESHNODE_ENGINE_THREADS": "1"}  # six engines on this machine
    flags = ("--name", "--mesh-preset", "local", "--no-mdns")
    if args.prompt_cache_mb is not None:
        flags += ("--prompt-cache-mb", str(args.prompt_cache_mb))
    nodes: list[NodeProcess] = []
    try:
        nodes.append(NodeProcess(tmp / "a", *flags[:1], "a", *flags[1:], env=env))
        for n in "bcdefghijklmnopqrstuvwxyz"[:args.replicas - 1]:
            nodes.append(NodeProcess(tmp / n, *flags[:1], n, *flags[1:],
                                     "--join", nodes[0].gossip, env=env))
        deadline = time.monotonic() + 30
        while len(get_json(nodes[0].url + "/v1/cluster/nodes")["data"]) < args.replicas:
            assert time.monotonic() < deadline, "nodes did not join"
            time.sleep(0.2)
        for name in ("aff", "rr"):
            urllib.request.urlopen(urllib.request.Request(
                nodes[0].url + "/v1/deployments", method="POST",
                data=json.dumps({"model": MODEL, "name": name,
                                 "replicas": args.replicas}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
        for n in nodes:
            n.wait_ready("aff", "rr", timeout_s=600)
        urls = [n.url for n in nodes]
        cache = "node default" if args.prompt_cache_mb is None else args.prompt_cache_mb
        started = time.monotonic()
        if args.turns == 1:
            reqs = workload(args.requests, args.prompts, args.seed, args.system_rules)
            print(f"seed {args.seed}: {args.requests} single-turn requests over {args.prompts}"
                  f" system prompts, concurrency {args.concurrency} per router, prompt cache"
                  f" {cache} MiB", file=sys.stderr)

            async def both() -> list[dict]:
                return await asyncio.gather(run("aff", urls, False, reqs, args.concurrency),
                                            run("rr", urls, True, reqs, args.concurrency))
        else:
            chats = conversations(args.conversations, args.prompts, args.turns, args.seed,
                                  args.system_rules)
            print(f"seed {args.seed}: {args.conversations} chats of {args.turns} turns over "
                  f"{args.prompts} system prompts, answers <= {args.answer_tokens} tokens, "
                  f"{args.concurrency} chats at once per router, prompt cache {cache} MiB",
                  file=sys.stderr)

            async def both() -> list[dict]:
                return await asyncio.gather(
                    run_chats("aff", urls, False, chats, args.answer_tokens, args.concurrency),
                    run_chats("rr", urls, True, chats, args.answer_tokens, args.concurrency))

        aff, rr = asyncio.run(both())
        elapsed = time.monotonic() - started
    finally:
        for n in nodes:
            n.stop()  # SIGTERM: a clean exit leaves no engine socket behind
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = aff["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else float("inf")
    result = {"bench": "prefix_affinity", "replicas": args.replicas, "turns": args.turns,
              "requests": args.requests if args.turns == 1 else args.conversations * args.turns,
              "conversations": args.conversations if args.turns > 1 else None,
              "prompts": args.prompts, "system_rules": args.system_rules,
              "answer_tokens": args.answer_tokens if args.turns > 1 else None,
              "concurrency": args.concurrency, "seed": args.seed,
              "prompt_cache_mb": args.prompt_cache_mb, "workload_s": round(elapsed, 1),
              "affinity": aff, "round_robin": rr, "hit_rate_ratio": round(ratio, 2),
              "ttft_p50_ratio": round(aff["ttft_p50_ms"] / rr["ttft_p50_ms"], 2),
              "ratio_bound": min(args.replicas, args.prompts)}
    print(json.dumps(result))
    print(f"\n{'router':12} {'hit rate':>9} {'ttft p50 ms':>12} {'max/mean':>9} "
          f"{'switches':>9}  served")
    for label, r in (("affinity", aff), ("round-robin", rr)):
        print(f"{label:12} {r['hit_rate']:>9} {r['ttft_p50_ms']:>12} {r['max_over_mean']:>9}"
              f" {r['switches']:>9}  {r['served']}")
    if args.turns > 1:
        print(f"hit rate by turn: affinity {aff['hit_rate_by_turn']}, "
              f"round-robin {rr['hit_rate_by_turn']}")
    print(f"\nhit rate ratio {result['hit_rate_ratio']}x (target >= 3.8x; bound for "
          f"single-turn requests {result['ratio_bound']}x), ttft ratio "
          f"{result['ttft_p50_ratio']}x, affinity max/mean {aff['max_over_mean']} "
          f"(target <= 1.25)")


if __name__ == "__main__":
    main()
