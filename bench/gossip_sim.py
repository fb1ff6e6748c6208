"""Gossip convergence and failure detection on the simulated network (tests/mesh/sim.py).

For n = 10, 100, 1000 nodes with MeshConfig.lan() (memberlist's DefaultLANConfig), over
several seeds:
  - join:  a new node joins through one member; time until 99.99 % of members see it alive;
  - death: a member crashes (kill -9: no leave); time until 99.99 % of the others see it dead;
  - bandwidth: bytes sent per node per second, steady (no churn) and over the join + death;
  - false deaths: MemberDead events about live nodes under 10 % and 20 % random loss.
Times are simulated seconds (link latency 1-3 ms), so they measure the protocol, not Python.
p50 / p99 are nearest-rank over the seeds (with few seeds, p99 is the worst run).

Anchors printed beside the results: Serf's convergence model (2.0 s at 100 nodes, 2.2 s at
1000, at most 328 kbps per node), and memberlist's detection of a kill -9 in about 1.6 probe
periods plus the minimum suspicion timeout (suspicion_mult * max(1, log10 n) * probe interval).
Death is also split into the first suspicion (where the victim happens to stand in the
survivors' shuffled probe orders: it varies from seed to seed) and suspicion to dead (the
timers: it should equal the suspicion timeout plus a little gossip).

    python bench/gossip_sim.py            # default: about 3 CPU minutes
    python bench/gossip_sim.py --seeds 10 --loss-seconds 1800 --sizes 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "mesh")]

from sim import Sim, SimNode

from meshnode.mesh import MemberDead, MemberJoined, MemberSuspected, MeshConfig
from meshnode.mesh.config import suspicion_timeout

SERF = {100: 2.0, 1000: 2.2}  # seconds to converge, Serf's convergence simulator
SERF_KBPS = 328
COVERAGE = 0.9999


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def reach_time(times: list[float], observers: int, start: float) -> float | None:
    """Time from ``start`` until ceil(COVERAGE * observers) of them saw the event."""
    need = math.ceil(COVERAGE * observers)
    if len(times) < need:
        return None
    return sorted(times)[need - 1] - start


def one_run(n: int, seed: int, cfg: MeshConfig) -> dict[str, float | None]:
    sim = Sim(seed, cfg, record_events=False)
    first_seen: dict[tuple[str, type], dict[int, float]] = {}

    def on_event(node: SimNode, t: float, event: object) -> None:
        key = (event.member.node_id, type(event))  # type: ignore[attr-defined]
        first_seen.setdefault(key, {}).setdefault(node.index, t)

    sim.on_event = on_event
    nodes = sim.bootstrap(n - 1)
    sim.run_for(3.0)  # staggered timers settle
    bytes0, t0 = sum(sim.bytes_sent.values()), sim.now
    sim.run_for(10.0)
    steady = (sum(sim.bytes_sent.values()) - bytes0) / (sim.now - t0) / (n - 1)

    churn_bytes0, churn_t0 = sum(sim.bytes_sent.values()), sim.now
    start = sim.now
    new = sim.add_node(join=[sim.rng.choice(nodes)])
    joined = first_seen.setdefault((new.node_id, MemberJoined), {})
    sim.run_until_true(lambda: len(joined) >= math.ceil(COVERAGE * (n - 1)), 30, step_s=0.05)
    join_s = reach_time(list(joined.values()), n - 1, start)

    victim = sim.rng.choice(nodes)
    sim.crash(victim)
    start = sim.now
    died = first_seen.setdefault((victim.node_id, MemberDead), {})
    sim.run_until_true(lambda: len(died) >= math.ceil(COVERAGE * (n - 1)), 200, step_s=0.1)
    death_s = reach_time(list(died.values()), n - 1, start)
    suspected = first_seen.get((victim.node_id, MemberSuspected), {})
    first_suspect = min(suspected.values()) - start if suspected else None
    churn = (sum(sim.bytes_sent.values()) - churn_bytes0) / (sim.now - churn_t0) / n
    return {"join_s": join_s, "death_s": death_s, "first_suspect_s": first_suspect,
            "steady_Bps": steady, "churn_Bps": churn}


def false_deaths(n: int, loss: float, seconds: float, seed: int, cfg: MeshConfig) -> dict:
    sim = Sim(seed, cfg, loss=loss, record_events=False)
    counts = {"dead": 0, "suspect": 0}

    def on_event(node: SimNode, t: float, event: object) -> None:
        if isinstance(event, MemberDead):
            counts["dead"] += 1
        elif isinstance(event, MemberSuspected):
            counts["suspect"] += 1

    sim.on_event = on_event
    sim.bootstrap(n)
    sim.run_for(seconds)
    return {"false_dead_events": counts["dead"], "suspect_events": counts["suspect"],
            "sim_s": seconds, "node_s": n * seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--seeds", type=int, default=0,
                        help="seeds per size (default: 5 for n<=100, 3 for n=1000)")
    parser.add_argument("--loss-seconds", type=float, default=0,
                        help="simulated seconds per loss run (default: 600/300/10 for "
                             "10/100/1000 nodes: 1000 nodes at 20%% loss cost ~5 CPU s per "
                             "simulated s)")
    parser.add_argument("--first-seed", type=int, default=1)
    args = parser.parse_args()
    cfg = MeshConfig.lan()
    started = time.perf_counter()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        seeds = args.seeds or (3 if n >= 1000 else 5)
        runs = [one_run(n, args.first_seed + i, cfg) for i in range(seeds)]
        loss_s = args.loss_seconds or {10: 600, 100: 300}.get(n, 10)
        loss = {f"{int(p * 100)}pct": false_deaths(n, p, loss_s, args.first_seed, cfg)
                for p in (0.1, 0.2)}
        joins = [r["join_s"] for r in runs if r["join_s"] is not None]
        deaths = [r["death_s"] for r in runs if r["death_s"] is not None]
        rows.append({
            "n": n, "seeds": seeds,
            "join_p50_s": percentile(joins, 0.5), "join_p99_s": percentile(joins, 0.99),
            "join_unfinished": seeds - len(joins),
            "death_p50_s": percentile(deaths, 0.5), "death_p99_s": percentile(deaths, 0.99),
            "death_unfinished": seeds - len(deaths),
            "first_suspect_p50_s": percentile(
                [r["first_suspect_s"] for r in runs if r["first_suspect_s"] is not None], 0.5),
            # The part that the protocol's timers decide: the model's suspicion timeout
            # (plus gossip); the first suspicion before it is the luck of the probe order.
            "suspect_to_dead_p50_s": percentile(
                [r["death_s"] - r["first_suspect_s"] for r in runs
                 if r["death_s"] is not None and r["first_suspect_s"] is not None], 0.5),
            "suspicion_timeout_s": suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval_s),
            "steady_kbps_per_node": percentile([(r["steady_Bps"] or 0.0) * 8 / 1000 for r in runs], 0.5),
            "churn_kbps_per_node": percentile([(r["churn_Bps"] or 0.0) * 8 / 1000 for r in runs], 0.5),
            "memberlist_detect_anchor_s": 1.6 * cfg.probe_interval_s + suspicion_timeout(
                cfg.suspicion_mult, n, cfg.probe_interval_s),
            "serf_converge_anchor_s": SERF.get(n),
            "loss": loss,
        })
        print(f"n={n} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    result = {"bench": "gossip_sim", "config": "lan", "coverage": COVERAGE, "rows": rows,
              "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    print_table(rows)


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'n':>5} | {'join p50/p99 s':>15} | {'Serf':>5} | {'death p50/p99 s':>16} | "
          f"{'memberlist':>10} | {'suspect/+dead':>13} | {'kbps steady/churn':>17} | "
          f"{'false deaths 10%/20% loss':>30}")
    print("-" * 132)
    for r in rows:
        l10, l20 = r["loss"]["10pct"], r["loss"]["20pct"]
        deaths = (f"{l10['false_dead_events']}/{l20['false_dead_events']} "
                  f"in {l10['node_s']:.0f} node-s")
        print(f"{r['n']:>5} | {fmt(r['join_p50_s']):>7}/{fmt(r['join_p99_s']):<7} | "
              f"{fmt(r['serf_converge_anchor_s'], 1):>5} | "
              f"{fmt(r['death_p50_s']):>7}/{fmt(r['death_p99_s']):<8} | "
              f"{fmt(r['memberlist_detect_anchor_s'], 1):>10} | "
              f"{fmt(r['first_suspect_p50_s']):>5}/{fmt(r['suspect_to_dead_p50_s']):<7} | "
              f"{fmt(r['steady_kbps_per_node'], 1):>8}/{fmt(r['churn_kbps_per_node'], 1):<8} | "
              f"{deaths:>30}")
    print(f"\nSerf anchor: convergence within ~2 s up to 1000 nodes at <= {SERF_KBPS} kbps/node; "
          "memberlist anchor: kill -9 detected in ~1.6 probe periods + min suspicion timeout.")
    print(f"Times in simulated seconds to reach {COVERAGE:.2%} of nodes; false deaths are "
          "MemberDead events (summed over all observers) about nodes that never failed.")
    print("suspect/+dead: p50 of the first suspicion after the crash, and of the time from it "
          "to dead on 99.99 % (model: the suspicion timeout, "
          + ", ".join(f"{r['suspicion_timeout_s']:.1f}" for r in rows) + " s).")


if __name__ == "__main__":
    main()
