"""Micro-benchmark of meshnode.mesh.hashing: calls per second by node count, in one run.

    python bench/hashing.py [--seconds 0.5] [--vnodes 160]

Prints one JSON line, then a table. For each n in 3, 10, 100, 1000: Ring build time,
Ring.lookup, Ring.choose (loads on every node, so the load total is part of the cost) and
rendezvous_top(k=3), each the best of three timed runs over distinct 64-character keys.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

try:
    from meshnode.mesh.hashing import DEFAULT_VNODES, Ring, rendezvous_top
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from meshnode.mesh.hashing import DEFAULT_VNODES, Ring, rendezvous_top

SIZES = (3, 10, 100, 1000)
KEYS = [f"{i:064x}" for i in range(4096)]


def rate(call: Callable[[str], object], seconds: float) -> float:
    """Best calls/s of three runs of about `seconds` each, cycling through KEYS."""
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            for key in KEYS[:256]:
                call(key)
            done += 256
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
        KEYS.append(KEYS.pop(0))  # different keys next run
    return best


def build_ms(nodes: list[str], vnodes: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        Ring(nodes, vnodes)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per timed run")
    parser.add_argument("--vnodes", type=int, default=DEFAULT_VNODES)
    args = parser.parse_args()

    rows = []
    for n in SIZES:
        nodes = [f"node-{i:04d}" for i in range(n)]
        weights = {node: 1.0 + i % 4 for i, node in enumerate(nodes)}
        loads = {node: i % 5 for i, node in enumerate(nodes)}
        ring = Ring(nodes, args.vnodes)
        rows.append(
            {
                "nodes": n,
                "build_ms": round(build_ms(nodes, args.vnodes), 3),
                "lookup_per_s": round(rate(ring.lookup, args.seconds)),
                "choose_per_s": round(rate(partial(ring.choose, loads=loads), args.seconds)),
                "rendezvous_top3_per_s": round(
                    rate(partial(rendezvous_top, nodes=weights, k=3), args.seconds)
                ),
            }
        )
    print(
        json.dumps(
            {
                "bench": "hashing",
                "python": platform.python_version(),
                "machine": platform.machine(),
                "vnodes": args.vnodes,
                "results": rows,
            }
        )
    )
    header = ("nodes", "build ms", "lookup/s", "choose/s", "rendezvous_top(k=3)/s")
    print(f"{header[0]:>6} {header[1]:>9} {header[2]:>11} {header[3]:>11} {header[4]:>22}")
    for row in rows:
        print(
            f"{row['nodes']:>6} {row['build_ms']:>9.2f} {row['lookup_per_s']:>11,}"
            f" {row['choose_per_s']:>11,} {row['rendezvous_top3_per_s']:>22,}"
        )


if __name__ == "__main__":
    main()
