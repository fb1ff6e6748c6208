"""A partition between two hosts only (root only, network namespaces): h0 and h1 stop
reaching each other while h2 reaches both, so membership keeps h1 alive in h0's view (h2's
indirect probes answer for it) and nothing declares it dead. A stream h0 forwards from h1's
replica must still end: TCP keepalive on node-to-node connections breaks the connection
(upstream.KEEPALIVE, ~30 s), and the client gets the upstream_lost error event instead of
waiting for ever (real nodes, real SmolLM2).

The partition is a blackhole route to each other in h0's and h1's namespaces. The client
runs inside h0's namespace: nothing here talks to the test subnet from the root namespace.
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
          "'name': 'm', 'nodes': ['h1']}).encode(), headers={'Content-Type': "
          "'application/json'}), timeout=30).status)")
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


def test_a_stream_from_a_peer_only_this_node_cannot_reach_ends(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
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
        assert net.exec(0, sys.executable, "-c", LAUNCH, urls[0]).stdout.strip() == "201"
        wait_for(lambda: net.exec(0, sys.executable, "-c", READY, urls[0],
                                  check=False).stdout.strip() == "ready", 120, "ready on h1")

        client = net.popen(0, [sys.executable, "-c", STREAM, urls[0]], stdout=subprocess.PIPE,
                           text=True)
        assert client.stdout is not None
        stack.callback(client.stdout.close)
        assert client.stdout.readline().strip() == "first"
        net.exec(0, "ip", "route", "add", "blackhole", f"{net.ips[1]}/32")
        net.exec(1, "ip", "route", "add", "blackhole", f"{net.ips[0]}/32")
        cut = time.monotonic()

        # h2 still reaches both: h0 keeps h1 alive (never dead), so only keepalive can help.
        time.sleep(10)
        assert members(net, 0)["h1"]["state"] in ("alive", "suspect")
        result = json.loads(client.stdout.readline())
        ended = time.monotonic() - cut
        client.wait(30)
        last = json.loads(result["last"].removeprefix("data: "))
        assert last.get("error", {}).get("code") == "upstream_lost", last
        print(f"stream ended {ended:.1f} s after the cut")
        assert ended < 90, ended  # keepalive: 15 s idle + 3 probes 5 s apart, and slack
        assert members(net, 0)["h1"]["state"] != "dead"
