"""Routing overhead: entering the mesh at a node without the model versus calling its holder.

Two real nodes on loopback (joined by --join) and one SmolLM2 replica, which placement puts on
one of them (the holder); the other is the entry. Three paths to the same replica, measured
in one run, interleaved round by round in a rotating order (the machine is shared and noisy):

    direct  client -> holder -> engine
    mesh    client -> entry -> (forward, hop header) -> holder -> engine
    nginx   client -> nginx (proxy_pass, upstream keep-alive) -> holder -> engine   (reference)

Each request is a 1-token completion (max_tokens=1) with the same prompt. Added latency of a
path = its p50 (p99) minus direct's; also the median of the per-round paired differences,
which cancels most of the drift of a shared machine.

With `--replicas N` (N >= 2) the deployment has N replicas on N holders and the entry is
one more node: it routes by the prompt's prefix among them (the ring, the prefix
assignment, bounded loads), so the mesh path also pays for choosing; the prompt is fixed,
so every request belongs to one holder, which `direct` and nginx call.

    python bench/routing.py [--rounds 200] [--replicas 1]

Targets: mesh p50 added <= 1 ms and <= 2x nginx's added p50. Needs nginx (Debian:
apt-get install -y nginx); without it the nginx column is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import NodeProcess, get_json

MODEL = "smollm2-135m-instruct"
BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1,
        "temperature": 0.0}
NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream holder {{ server {upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://holder;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(upstream: str, tmp: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                    else None)
    if exe is None:
        return None, ""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp, upstream=upstream, port=port))
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, ""


async def one(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=BODY) as resp:
        body = await resp.read()
        assert resp.status == 200, (url, resp.status, body[:300])
        served = resp.headers.get("X-Served-By", "")
    return (time.perf_counter() - start) * 1000, served


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(paths: dict[str, str], rounds: int, holder: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p: [] for p in paths}
    names = list(paths)
    async with aiohttp.ClientSession() as session:
        for name in names * 5:  # warm up connections and the prompt cache
            await one(session, paths[name])
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                ms, served = await one(session, paths[name])
                assert served == holder, (name, served)
                times[name].append(ms)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    nodes: list[NodeProcess] = []
    nginx = None
    try:
        names = [chr(ord("a") + i) for i in range(max(2, args.replicas + 1))]
        for name in names:
            nodes.append(NodeProcess(tmp / name, "--name", name, "--mesh-preset", "local",
                                     *(("--join", nodes[0].gossip) if nodes else ())))
        by_name = dict(zip(names, nodes, strict=True))
        launch = {"model": MODEL, "replicas": args.replicas}
        if args.replicas > 1:  # the last node is the entry
            launch["nodes"] = names[:args.replicas]
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(
            nodes[0].url + "/v1/deployments", data=json.dumps(launch).encode(),
            method="POST", headers={"Content-Type": "application/json"}), timeout=60).read()
        for n in nodes:
            n.wait_ready(MODEL, timeout_s=300)
        deadline = time.monotonic() + 60
        while len(ready := [p["node"] for p in get_json(
                nodes[-1].url + f"/v1/deployments/{MODEL}")["placed"]
                if p["state"] == "ready"]) < args.replicas:
            assert time.monotonic() < deadline, "replicas not ready"
            time.sleep(0.2)
        entry = next(n for n in names if n not in ready)
        with urllib.request.urlopen(urllib.request.Request(
                by_name[entry].url + "/v1/completions", data=json.dumps(BODY).encode(),
                headers={"Content-Type": "application/json"}), timeout=60) as resp:
            holder = resp.headers["X-Served-By"]  # the prompt's replica
        paths = {"direct": by_name[holder].url, "mesh": by_name[entry].url}
        nginx, nginx_url = start_nginx(by_name[holder].url.removeprefix("http://"), tmp)
        if nginx is not None:
            paths["nginx"] = nginx_url
        times = asyncio.run(measure(paths, args.rounds, holder))
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(5)
            except subprocess.TimeoutExpired:
                nginx.kill()
        for n in nodes:
            n.stop()  # SIGTERM: a clean exit leaves no engine socket behind
        shutil.rmtree(tmp, ignore_errors=True)

    direct = times["direct"]
    result: dict[str, object] = {"bench": "routing", "rounds": args.rounds,
                                 "replicas": args.replicas}
    for name, xs in times.items():
        result[f"{name}_p50_ms"] = round(pct(xs, 0.5), 3)
        result[f"{name}_p99_ms"] = round(pct(xs, 0.99), 3)
        if name != "direct":
            result[f"{name}_added_p50_ms"] = round(pct(xs, 0.5) - pct(direct, 0.5), 3)
            result[f"{name}_added_p99_ms"] = round(pct(xs, 0.99) - pct(direct, 0.99), 3)
            result[f"{name}_added_paired_ms"] = round(
                statistics.median(x - d for x, d in zip(xs, direct, strict=True)), 3)
    if "nginx" in times:
        nginx_added = max(float(result["nginx_added_paired_ms"]), 1e-3)  # type: ignore[arg-type]
        result["mesh_vs_nginx_added"] = round(
            float(result["mesh_added_paired_ms"]) / nginx_added, 2)  # type: ignore[arg-type]
    print(json.dumps(result))
    print(f"\n{'path':8} {'p50 ms':>9} {'p99 ms':>9} {'added p50':>10} {'added p99':>10} "
          f"{'paired':>8}")
    for name in times:
        added = (f"{result[f'{name}_added_p50_ms']:>10} {result[f'{name}_added_p99_ms']:>10} "
                 f"{result[f'{name}_added_paired_ms']:>8}") if name != "direct" else ""
        print(f"{name:8} {result[f'{name}_p50_ms']:>9} {result[f'{name}_p99_ms']:>9} {added}")
    if "mesh_vs_nginx_added" in result:
        print(f"\nmesh added / nginx added (paired medians): {result['mesh_vs_nginx_added']}x "
              "(target <= 2x; and mesh added p50 <= 1 ms)")


if __name__ == "__main__":
    main()
