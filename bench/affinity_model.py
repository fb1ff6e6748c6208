"""A model of bench/prefix_affinity.py's multi-turn workload: what hit-rate ratio (affinity over
round-robin) to expect at R replicas, without engines.

Each replica is a FIFO server that keeps the token sequence of the last request it served (the
llama.cpp context with the prompt cache off) and, with `--cache-tokens K`, an LRU of saved
sequences holding at most K tokens (the multi-prefix prompt cache). `--chats` chats of `--turns`
turns run `--concurrency` at once; chat c opens with system prompt c % P (P = `--prompts`,
`--system-tokens` long), each turn adds a question (`--question-tokens`) and an answer of 20 to
`--answer-tokens` tokens. A request's prefill takes PREFILL_S per uncached token, its decode
DECODE_S per answer token; a chat sends its next turn when the last one is answered.

    affinity     every chat of a system prompt goes to that prompt's replica (prompts spread
                 over replicas in turn): what the mesh does with long system prompts
    round-robin  request i goes to replica i % R

    hit rate     = sum(reused prefix tokens) / sum(prompt tokens), as the benchmark measures it

Round-robin sends a chat's next turn to the replica that holds its history about 1 time in R,
so the ratio tends to R times affinity's hit rate over a full-history hit: about R at most.

    python bench/affinity_model.py                        # R = 3, 5, 8 with C = P = R
    python bench/affinity_model.py --replicas 3 --cache-tokens 3000
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
from collections import OrderedDict

from meshnode.engines.prompt_cache import common_prefix

PREFILL_S = 0.0005
"""Seconds per prompt token evaluated (SmolLM2 on these cores is ~20x faster at prefill)."""
DECODE_S = 0.01
"""Seconds per generated token (~100 tokens/s)."""


class Replica:
    def __init__(self, cache_tokens: int) -> None:
        self.live: tuple[int, ...] = ()
        self.saved: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.cache_tokens = cache_tokens
        self.free_at = 0.0

    def reused(self, prompt: tuple[int, ...]) -> int:
        """Prompt tokens taken from the context or a saved sequence (the last one is always
        evaluated)."""
        best = max([common_prefix(self.live, prompt),
                    *(common_prefix(s, prompt) for s in self.saved)])
        return min(best, len(prompt) - 1)

    def keep(self, seq: tuple[int, ...]) -> None:
        self.live = seq
        if self.cache_tokens <= 0:
            return
        for s in [s for s in self.saved if common_prefix(s, seq) == len(s)]:
            del self.saved[s]  # the new sequence covers it
        self.saved[seq] = None
        while sum(map(len, self.saved)) > self.cache_tokens:
            self.saved.popitem(last=False)


def hit_rate(router: str, args: argparse.Namespace, replicas: int, chats: int,
             concurrency: int, prompts: int, seed: int) -> float:
    rng = random.Random(seed)
    servers = [Replica(args.cache_tokens) for _ in range(replicas)]
    fresh = itertools.count(1 << 30)  # token ids no system prompt uses
    systems = [tuple(range(p << 16, (p << 16) + args.system_tokens)) for p in range(prompts)]
    waiting = list(range(chats))
    turn_of: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # worker -> (chat, turn, context)
    sent = itertools.count()
    reused = total = 0
    ready = [(0.0, w) for w in range(concurrency)]  # (time, worker) a worker sends next
    while ready:
        now, worker = heapq.heappop(ready)
        chat, turn, context = turn_of.get(worker, (-1, args.turns, ()))
        if turn >= args.turns:
            if not waiting:
                continue
            chat = waiting.pop(0)
            turn, context = 0, systems[chat % prompts]
        prompt = context + tuple(next(fresh) for _ in range(args.question_tokens))
        index = (chat % prompts) % replicas if router == "affinity" else next(sent) % replicas
        server = servers[index]
        hit = server.reused(prompt)
        reused, total = reused + hit, total + len(prompt)
        answer = tuple(next(fresh) for _ in range(rng.randint(20, args.answer_tokens)))
        server.free_at = (max(now, server.free_at) + (len(prompt) - hit) * PREFILL_S
                          + len(answer) * DECODE_S)
        server.keep(prompt + answer[:-1])  # the last sampled token is never evaluated
        turn_of[worker] = (chat, turn + 1, prompt + answer)
        heapq.heappush(ready, (server.free_at + rng.uniform(0, 0.01), worker))
    return reused / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[3, 5, 8],
                        help="R values; chats = 4R, concurrency = prompts = R unless given")
    parser.add_argument("--chats", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=420)
    parser.add_argument("--question-tokens", type=int, default=15)
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--cache-tokens", type=int, default=0,
                        help="tokens each replica's prompt cache holds (0: the context only)")
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    if min(*args.replicas, args.turns, args.system_tokens, args.question_tokens,
           args.seeds) < 1 or args.answer_tokens < 20 or args.cache_tokens < 0:
        parser.error("counts must be >= 1, --answer-tokens >= 20, --cache-tokens >= 0")
    rows = []
    for r in args.replicas:
        chats, conc = args.chats or 4 * r, args.concurrency or r
        prompts = args.prompts or r
        pairs = [(hit_rate("affinity", args, r, chats, conc, prompts, s),
                  hit_rate("round-robin", args, r, chats, conc, prompts, s))
                 for s in range(1, args.seeds + 1)]
        ratios = [a / b for a, b in pairs]
        rows.append({"replicas": r, "chats": chats, "concurrency": conc, "prompts": prompts,
                     "affinity": round(statistics.mean(a for a, _ in pairs), 3),
                     "round_robin": round(statistics.mean(b for _, b in pairs), 3),
                     "ratio_mean": round(statistics.mean(ratios), 2),
                     "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2)})
    print(json.dumps({"bench": "affinity_model", "turns": args.turns,
                      "cache_tokens": args.cache_tokens, "seeds": args.seeds, "rows": rows}))
    print(f"\n{'R':>3} {'chats':>6} {'at once':>8} {'prompts':>8} {'affinity':>9} "
          f"{'round-robin':>12} {'ratio (min-max)':>18}")
    for row in rows:
        print(f"{row['replicas']:>3} {row['chats']:>6} {row['concurrency']:>8} "
              f"{row['prompts']:>8} {row['affinity']:>9} {row['round_robin']:>12} "
              f"{row['ratio_mean']:>7}x ({row['ratio_min']}-{row['ratio_max']})")


if __name__ == "__main__":
    main()
