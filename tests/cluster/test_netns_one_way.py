"""A partition between two hosts only (root only, network namespaces): h0 and h1 stop
reaching each other while h2 reaches both, so membership keeps h1 alive in h0's view (h2's
indirect probes answer for it) and nothing declares it dead. A stream h0 forwards from h1's
replica must still end, with the upstream_lost error event, instead of leaving the client
waiting for ever: h0 finds h1 unreachable (h1 answers h0's probes only through h2, and h0's
connection check fails) and cuts the stalled answer off (upstream.SILENT_S); TCP keepalive on
node-to-node connections (upstream.KEEPALIVE and UNACKED_S, ~20 s) would end it later anyway
(real nodes, real SmolLM2).

The partition is a blackhole route to each other in h0's and h1's namespaces. The client
runs inside h0's namespace: nothing here talks to the test subnet from the root namespace.

The second test cuts only h1's way back to h0 (h0's packets still arrive, nothing comes back:
connects time out, as across a broken link): h0 must stop routing to h1's replica after one
failed try (node/reach.py), serve those prefixes from h2 without waiting (the request caught
by the cut moves there once h0 finds the path broken, before TCP gives up on it), and route to
h1 again once the way back is restored. Cut a second time with no request in flight, h0 must find
the broken path from membership's hint alone (h1 answers only through h2) before any request
pays for it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from conftest import needs_llama, wait_for
from test_netns_cluster import members

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, needs_llama, pytest.mark.timeout(600),
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

LAUNCH = ("import json, sys, urllib.request; print(urllib.request.urlopen(urllib.request.Request("
          "sys.argv[1] + '/v1/deployments', data=json.dumps({'model': 'smollm2-135m-instruct', "
          "'name': 'm', 'nodes': sys.argv[2:], 'replicas': len(sys.argv[2:])}).encode(), "
          "headers={'Content-Type': 'application/json'}), timeout=30).status)")
READY = ("import json, sys, urllib.request; v = json.load(urllib.request.urlopen(sys.argv[1] + "
         "'/v1/deployments/m', timeout=5)); print(v['status'])")
# Streams a counting completion through h0; prints "first" at its first event, then the last
# event once the stream ends (or what stopped the client).
STREAM = """
import json, sys, time, urllib.request
req = urllib.request.Request(sys.argv[1] + '/v1/completions', data=json.dumps({
    'model': 'm', 'prompt': 'Count from 1 to 1000: 1, 2, 3, 4, 5,', 'stream': True,
    'max_tokens': 4000, 'temperature': 0.0}).encode(), headers={'Content-Type':
    'application/json'})
last, started = b'data: {}', None
try:
    with urllib.request.urlopen(req, timeout=120) as r:  # a stalled read ends at 120 s
        for line in r:
            if line.startswith(b'data: '):
                if started is None:
                    started = time.monotonic()
                    print('first', flush=True)
                last = line
except OSError as exc:
    last = b'data: ' + json.dumps({'client': repr(exc)}).encode()
print(json.dumps({'last': last.decode()}), flush=True)
"""


def _cluster(stack: contextlib.ExitStack, tmp_path: Path, *holders: str
             ) -> tuple[netns.Net, list[str]]:
    """Three nodes h0..h2 in namespaces, deployment m ready on `holders`; (net, h0..h2 URLs)."""
    net = stack.enter_context(netns.Net(3))
    urls = [f"http://{ip}:7700" for ip in net.ips]
    for i in range(3):
        log = stack.enter_context(open(tmp_path / f"h{i}.log", "wb"))
        seeds = [] if i == 0 else ["--join", f"{net.ips[0]}:7701"]
        net.popen(i, [sys.executable, "-m", "meshnode", "start", "--host", net.ips[i],
                      "--name", f"h{i}", "--data-dir", str(tmp_path / f"h{i}"),
                      "--mesh-preset", "local", "--log-format", "json", "--no-mdns",
                      "--insecure", *seeds],  # an open cluster off loopback, on purpose
                  stdout=subprocess.DEVNULL, stderr=log)
    for i in range(3):
        wait_for(lambda: {n for n, m in members(net, i).items() if m["state"] == "alive"}
                 == {"h0", "h1", "h2"}, 60, f"h{i} sees everyone")
    assert net.exec(0, sys.executable, "-c", LAUNCH, urls[0], *holders).stdout.strip() == "201"
    wait_for(lambda: net.exec(0, sys.executable, "-c", READY, urls[0],
                              check=False).stdout.strip() == "ready", 180, f"ready on {holders}")
    return net, urls


def test_a_stream_from_a_peer_only_this_node_cannot_reach_ends(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        net, urls = _cluster(stack, tmp_path, "h1")

        client = net.popen(0, [sys.executable, "-c", STREAM, urls[0]], stdout=subprocess.PIPE,
                           text=True)
        assert client.stdout is not None
        stack.callback(client.stdout.close)
        assert client.stdout.readline().strip() == "first"
        net.exec(0, "ip", "route", "add", "blackhole", f"{net.ips[1]}/32")
        net.exec(1, "ip", "route", "add", "blackhole", f"{net.ips[0]}/32")
        cut = time.monotonic()

        # h2 still reaches both: h0 keeps h1 alive (never dead), so membership alone does
        # not end the stream.
        result = json.loads(client.stdout.readline())
        ended = time.monotonic() - cut
        client.wait(30)
        last = json.loads(result["last"].removeprefix("data: "))
        assert last.get("error", {}).get("code") == "upstream_lost", last
        print(f"stream ended {ended:.1f} s after the cut")
        h1 = members(net, 0)["h1"]
        assert h1["state"] in ("alive", "suspect") and not h1["reachable"], h1
        assert ended < 10, ended  # keepalive alone: ~20 s


# Sends each prompt (argv[2:]) through argv[1] in turn as a one-token completion; prints one
# JSON line per request: the serving node and the seconds it took.
SEND = """
import json, sys, time, urllib.request
for prompt in sys.argv[2:]:
    start = time.monotonic()
    req = urllib.request.Request(sys.argv[1] + '/v1/completions', data=json.dumps({
        'model': 'm', 'prompt': prompt, 'max_tokens': 1, 'temperature': 0.0}).encode(),
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=120) as r:
        served = r.headers['X-Served-By']
    print(json.dumps({'served': served, 's': round(time.monotonic() - start, 2)}), flush=True)
"""


def test_a_peer_this_node_cannot_connect_to_is_skipped_until_it_can(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        net, urls = _cluster(stack, tmp_path, "h1", "h2")

        def send(*prompts: str) -> list[dict]:
            out = net.exec(0, sys.executable, "-c", SEND, urls[0], *prompts).stdout
            return [json.loads(line) for line in out.splitlines()]

        # Prompts whose prefixes h0 routes to h1 (the ring spreads them over both holders).
        prompts = [f"Topic {i}: tell me about {word}." for i, word in enumerate(
            "rivers mountains deserts forests oceans islands glaciers valleys caves lakes "
            "plains canyons volcanoes reefs marshes dunes".split())]
        # A burst of new prefixes spreads like a ring, and the assignment evens it out once
        # the ledgers are gossiped (prefixes.py): wait until three passes in a row agree.
        passes: list[list[str]] = []

        def settled() -> bool:
            passes.append([r["served"] for r in send(*prompts)])
            return len(passes) >= 3 and passes[-1] == passes[-2] == passes[-3]

        wait_for(settled, 60, "the prefix assignment settles")
        on_h1 = [p for p, node in zip(prompts, passes[-1]) if node == "h1"]
        assert len(on_h1) >= 3 and "h2" in passes[-1], passes[-1]

        net.exec(1, "ip", "route", "add", "blackhole", f"{net.ips[0]}/32")  # h1 -/-> h0
        got = send(*on_h1)
        print("after the cut:", got)
        assert [r["served"] for r in got] == ["h2"] * len(on_h1), got
        # The first request is written on a pooled connection into the broken path. It would
        # wait upstream.UNACKED_S (10 s); membership's hint (h1 answers h0's probe only
        # through h2) makes h0 try connections there, which time out (reach.CHECK_TIMEOUT_S,
        # 2 s), and the request, still unanswered, moves to h2 at once. The others go to h2
        # directly.
        assert got[0]["s"] < 4.5, got
        assert all(r["s"] < 3 for r in got[1:]), got
        assert '"forward.moved"' in (tmp_path / "h0.log").read_text()
        h1 = members(net, 0)["h1"]
        assert h1["state"] in ("alive", "suspect") and not h1["reachable"]  # h2 vouches for it
        table = net.exec(0, sys.executable, "-m", "meshnode", "members", "--endpoint",
                         urls[0]).stdout
        assert "unreachable from here" in next(r for r in table.splitlines()
                                               if r.startswith("h1")), table

        net.exec(1, "ip", "route", "del", "blackhole", f"{net.ips[0]}/32")
        healed = time.monotonic()
        wait_for(lambda: send(on_h1[0])[0]["served"] == "h1", 60, "h0 routes to h1 again")
        print(f"h1 back {time.monotonic() - healed:.1f} s after the heal")
        assert [r["served"] for r in send(*on_h1)] == ["h1"] * len(on_h1)
        assert members(net, 0)["h1"]["reachable"]
        log = (tmp_path / "h0.log").read_text()
        assert '"peer.unreachable"' in log and '"peer.reachable"' in log

        # Cut again, and send nothing: membership sees h1 answer h0's probes only through
        # h2 (MemberIndirect), h0 checks its own path there, and no request pays for it.
        net.exec(1, "ip", "route", "add", "blackhole", f"{net.ips[0]}/32")
        cut = time.monotonic()
        wait_for(lambda: not members(net, 0)["h1"]["reachable"], 60,
                 "h0 finds h1 unreachable with no request sent")
        print(f"h1 unreachable from h0 {time.monotonic() - cut:.1f} s after the second cut")
        got = send(*on_h1)
        print("after the second cut:", got)
        assert [r["served"] for r in got] == ["h2"] * len(on_h1), got
        assert all(r["s"] < 3 for r in got), got
        net.exec(1, "ip", "route", "del", "blackhole", f"{net.ips[0]}/32")
        wait_for(lambda: send(on_h1[0])[0]["served"] == "h1", 60, "h1 back after the second")
