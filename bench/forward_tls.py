"""Forwarding over mTLS (signed cluster) versus plain forwarding (open cluster), in one run.

Two 2-node clusters on loopback, each with one SmolLM2 replica on one node (the holder); the
other node is the entry:

    open     client -> entry -> (plain HTTP, hop header, holder's public port) -> holder
    signed   client -> entry -> (mTLS, holder's internal listener, cert checked) -> holder

Each request is a 1-token completion (max_tokens=1) with the same prompt; the paths (direct
to each holder, and through each entry) are interleaved round by round in a rotating order.
Added latency of forwarding = entry p50 (p99) minus the same cluster's direct p50 (p99); also
the median of per-round paired differences. Connections are pooled and kept alive, so the
TLS handshake is paid once per connection, not per request (bench/gossip_auth.py measures it).

    python bench/forward_tls.py [--rounds 200]

Prints one JSON line, then a table; `tls_vs_plain_added` is the signed path's added latency
over the open path's (paired medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import NodeProcess, get_json
from routing import MODEL, one, pct  # same request and percentile as bench/routing.py

from meshnode.mesh.certs import init_ca, issue_node_cert
from meshnode.mesh.certverify import certificate_pem
from meshnode.mesh.identity import NodeIdentity

ENV = {"MESHNODE_API_KEYS": "off"}


async def measure(paths: dict[str, tuple[str, str]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p: [] for p in paths}
    names = list(paths)
    async with aiohttp.ClientSession() as session:
        for name in names * 5:  # warm up: connections (and TLS sessions), prompt cache
            await one(session, paths[name][0])
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                url, holder = paths[name]
                ms, served = await one(session, url)
                assert served == holder, (name, served, holder)
                times[name].append(ms)
    return times


def cluster(tmp: Path, label: str, signed: bool) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    extra: list[str] = []
    if signed:
        ca = init_ca(tmp / "ca", "bench", None, allow_unencrypted=True)
        (tmp / "ca.pem").write_bytes(certificate_pem(ca.cert))
    for name in ("a", "b"):
        data = tmp / f"{label}-{name}"
        if signed:
            identity = NodeIdentity.load_or_create(data)
            cert = tmp / f"{label}-{name}.crt"
            cert.write_bytes(certificate_pem(issue_node_cert(ca, identity.public_key, name)))
            extra = ["--ca", str(tmp / "ca.pem"), "--cert", str(cert), "--internal-port", "0"]
        join = ["--join", nodes[0].gossip] if nodes else []
        nodes.append(NodeProcess(data, "--name", f"{label}-{name}", "--mesh-preset", "local",
                                 "--no-mdns", *extra, *join, env=ENV))
    deadline = time.monotonic() + 60  # launch once both see both: placement is then final
    while not all(sum(m["state"] == "alive" for m in get_json(n.url + "/v1/cluster/nodes")
                      ["data"]) == 2 for n in nodes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label} cluster did not form")
        time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(
        nodes[0].url + "/v1/deployments", data=json.dumps({"model": MODEL}).encode(),
        method="POST", headers={"Content-Type": "application/json"}), timeout=60).read()
    return nodes


def paths_of(label: str, nodes: list[NodeProcess]) -> dict[str, tuple[str, str]]:
    for n in nodes:
        n.wait_ready(MODEL, timeout_s=300)
    view = get_json(nodes[0].url + f"/v1/deployments/{MODEL}")
    holder = next(p["node"] for p in view["placed"] if p["state"] == "ready")
    by_name = {f"{label}-{x}": n for x, n in zip("ab", nodes, strict=True)}
    entry = next(name for name in by_name if name != holder)
    return {f"{label}_direct": (by_name[holder].url, holder),
            f"{label}_forward": (by_name[entry].url, holder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    nodes: list[NodeProcess] = []
    try:
        plain = cluster(tmp, "open", signed=False)
        nodes += plain
        signed = cluster(tmp, "signed", signed=True)
        nodes += signed
        paths = {**paths_of("open", plain), **paths_of("signed", signed)}
        times = asyncio.run(measure(paths, args.rounds))
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)

    result: dict[str, object] = {"bench": "forward_tls", "rounds": args.rounds}
    for name, xs in times.items():
        result[f"{name}_p50_ms"] = round(pct(xs, 0.5), 3)
        result[f"{name}_p99_ms"] = round(pct(xs, 0.99), 3)
    for label in ("open", "signed"):
        fwd, direct = times[f"{label}_forward"], times[f"{label}_direct"]
        result[f"{label}_added_p50_ms"] = round(pct(fwd, 0.5) - pct(direct, 0.5), 3)
        result[f"{label}_added_p99_ms"] = round(pct(fwd, 0.99) - pct(direct, 0.99), 3)
        result[f"{label}_added_paired_ms"] = round(
            statistics.median(f - d for f, d in zip(fwd, direct, strict=True)), 3)
    plain_added = max(float(result["open_added_paired_ms"]), 1e-3)  # type: ignore[arg-type]
    result["tls_vs_plain_added"] = round(
        float(result["signed_added_paired_ms"]) / plain_added, 2)  # type: ignore[arg-type]
    result["tls_minus_plain_added_ms"] = round(
        float(result["signed_added_paired_ms"])  # type: ignore[arg-type]
        - float(result["open_added_paired_ms"]), 3)  # type: ignore[arg-type]
    print(json.dumps(result))
    print(f"\n{'path':16} {'p50 ms':>9} {'p99 ms':>9}")
    for name in times:
        print(f"{name:16} {result[f'{name}_p50_ms']:>9} {result[f'{name}_p99_ms']:>9}")
    print(f"\n{'cluster':8} {'added p50':>10} {'added p99':>10} {'paired':>8}")
    for label in ("open", "signed"):
        print(f"{label:8} {result[f'{label}_added_p50_ms']:>10} "
              f"{result[f'{label}_added_p99_ms']:>10} {result[f'{label}_added_paired_ms']:>8}")
    print(f"\nmTLS forwarding adds {result['tls_minus_plain_added_ms']} ms over plain "
          f"({result['tls_vs_plain_added']}x the plain hop's added latency)")


if __name__ == "__main__":
    main()
