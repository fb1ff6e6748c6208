"""Failure detection of kill -9 in a real 5-node cluster on loopback.

Starts 5 `meshnode start` processes (no models) joined by --join, then per round kills one
with SIGKILL and measures the time until every survivor lists it as `dead` (and as `suspect`
first), then restarts it. Compares with memberlist's model in the same run's configuration:
about 1.6 probe periods to the first suspicion, plus the suspicion timeout
(suspicion_mult * max(1, log10 n) * probe_interval at full confirmation).

    python bench/gossip_real.py [--rounds 5] [--preset lan|local] [--settle-s S]

The first suspicion depends on where the victim stands in the survivors' shuffled probe orders
(a random wait of about one probe period on average, then the failing probe itself), so it
varies from round to round; suspicion to dead should equal the timeout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from meshnode.mesh import MeshConfig


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORTS: dict[str, int] = {}


def start(data_dir: str, name: str, preset: str, join: str | None) -> tuple[subprocess.Popen, str, str]:
    # A restarted node keeps its gossip port, as a configured node does (7701).
    port = PORTS.setdefault(name, free_port())
    argv = [sys.executable, "-m", "meshnode", "start", "--http-port", "0",
            "--gossip-port", str(port),
            "--data-dir", data_dir, "--name", name, "--mesh-preset", preset,
            "--log-level", "warning"]
    if join:
        argv += ["--join", join]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    gossip = proc.stdout.readline().decode().strip().rsplit(" ", 1)[1]
    url = proc.stdout.readline().decode().strip().rsplit(" ", 1)[1]
    return proc, url, gossip


def states(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url + "/v1/cluster/nodes", timeout=5) as resp:
        return {m["name"]: m["state"] for m in json.load(resp)["data"]}


def wait(pred, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pred():
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", choices=["lan", "local"], default="lan")
    parser.add_argument("--settle-s", type=float, default=None,
                        help="pause after a restarted node is alive everywhere, before the "
                             "next kill (default: 3 probe intervals)")
    args = parser.parse_args()
    cfg = MeshConfig.local() if args.preset == "local" else MeshConfig.lan()
    if args.settle_s is None:
        args.settle_s = 3 * cfg.probe_interval_s
    n = 5
    model = 1.6 * cfg.probe_interval_s + cfg.suspicion_mult * max(1.0, math.log10(n)) \
        * cfg.probe_interval_s
    detect, suspect = [], []
    with tempfile.TemporaryDirectory() as tmp:
        nodes = []
        try:
            first = start(os.path.join(tmp, "n0"), "n0", args.preset, None)
            nodes.append(first)
            for i in range(1, n):
                nodes.append(start(os.path.join(tmp, f"n{i}"), f"n{i}", args.preset, first[2]))
            names = {f"n{i}" for i in range(n)}
            wait(lambda: all({k for k, v in states(u).items() if v == "alive"} == names
                             for _, u, _ in nodes), 60)
            for r in range(args.rounds):
                victim = 1 + r % (n - 1)
                proc, _, _ = nodes[victim]
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                t0 = time.monotonic()
                survivors = [u for i, (_, u, _) in enumerate(nodes) if i != victim]
                name = f"n{victim}"
                def seen(ok: tuple[str, ...], every: bool, name: str = name,
                         among: list[str] = survivors) -> bool:
                    views = (states(u).get(name) in ok for u in among)
                    return all(views) if every else any(views)

                suspect.append(wait(lambda: seen(("suspect", "dead"), every=False), 120))
                wait(lambda: seen(("dead",), every=True), 120)
                detect.append(time.monotonic() - t0)
                print(f"round {r}: {name} first suspected after {suspect[-1]:.2f} s, dead on "
                      f"all survivors after {detect[-1]:.2f} s", file=sys.stderr)
                nodes[victim] = start(os.path.join(tmp, name), name, args.preset, first[2])
                try:
                    wait(lambda: all(states(u).get(name) == "alive"  # noqa: B023 (called now)
                                     for _, u, _ in nodes), 90)
                except TimeoutError:
                    raise SystemExit(f"{name} did not rejoin: "
                                     f"{[states(u) for _, u, _ in nodes]}") from None
                # Let the cluster settle before the next kill: the restarted node refuted its
                # own death, which raises its Lifeguard health score by 1, so for a probe
                # period or two its failing probes last twice as long (as in memberlist). The
                # model is of a healthy cluster, so the next kill waits for that to pass.
                if r + 1 < args.rounds:
                    time.sleep(args.settle_s)
        finally:
            for proc, _, _ in nodes:
                proc.kill()
                proc.wait()
    result = {"bench": "gossip_real", "nodes": n, "preset": args.preset, "rounds": args.rounds,
              "settle_s": args.settle_s,
              "first_suspect_s_p50": round(statistics.median(suspect), 3),
              "dead_everywhere_s_p50": round(statistics.median(detect), 3),
              "dead_everywhere_s_max": round(max(detect), 3),
              "suspect_to_dead_s_p50": round(statistics.median(
                  d - s for d, s in zip(detect, suspect, strict=True)), 3),
              "memberlist_model_s": round(model, 3),
              "ratio_vs_model": round(statistics.median(detect) / model, 3)}
    print(json.dumps(result))
    print()
    print(f"kill -9 in a {n}-node loopback cluster ({args.preset} timings, {args.rounds} rounds)")
    print(f"  first suspicion      p50 {result['first_suspect_s_p50']:.2f} s")
    print(f"  dead on all survivors p50 {result['dead_everywhere_s_p50']:.2f} s, "
          f"max {result['dead_everywhere_s_max']:.2f} s")
    print(f"  suspicion to dead    p50 {result['suspect_to_dead_s_p50']:.2f} s "
          f"(model: the suspicion timeout, {model - 1.6 * cfg.probe_interval_s:.2f} s)")
    print(f"  memberlist model     {model:.2f} s (1.6 probe periods + suspicion timeout)")
    print(f"  ratio                {result['ratio_vs_model']:.2f}x (target <= 1)")


if __name__ == "__main__":
    main()
