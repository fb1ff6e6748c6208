"""Real nodes as separate hosts in network namespaces on one bridge (root only):
discovery by mDNS with no seeds, a silent partition, and healing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import netns
import pytest
from conftest import wait_for

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

FETCH = ("import json, sys, urllib.request; print(json.dumps(json.load(urllib.request.urlopen("
         "sys.argv[1] + '/v1/cluster/nodes', timeout=5))['data']))")


def members(net: netns.Net, host: int) -> dict[str, dict]:
    out = net.exec(host, sys.executable, "-c", FETCH, f"http://{net.ips[host]}:7700",
                   check=False)
    if out.returncode != 0:
        return {}
    return {m["name"]: m for m in json.loads(out.stdout)}



def test_mdns_discovery_partition_and_heal(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(netns.Net(3))
        for i in range(3):
            log = stack.enter_context(open(tmp_path / f"h{i}.log", "wb"))
            net.popen(i, [sys.executable, "-m", "meshnode", "start", "--host", net.ips[i],
                          "--name", f"h{i}", "--data-dir", str(tmp_path / f"h{i}"),
                          "--mesh-preset", "local", "--log-format", "json",
                          "--insecure"],  # an open cluster off loopback, on purpose
                      stdout=subprocess.DEVNULL, stderr=log)
        names = {"h0", "h1", "h2"}

        def all_alive(host: int) -> bool:
            m = members(net, host)
            return set(m) == names and all(v["state"] == "alive" for v in m.values())

        # No seeds: the three find each other by mDNS alone.
        for i in range(3):
            wait_for(lambda: all_alive(i), 60, f"h{i} sees everyone alive")
        before = members(net, 0)["h2"]["incarnation"]

        # A silent partition at the bridge: h2's packets are dropped both ways.
        net.cut(2)
        seen_suspect = set()

        def dead_on(host: int) -> bool:
            state = members(net, host).get("h2", {}).get("state")
            if state == "suspect":
                seen_suspect.add(host)
            return state == "dead"

        for i in (0, 1):
            wait_for(lambda: dead_on(i), 30, f"h{i} declares h2 dead")

        # Healing brings it back alive, with a higher incarnation (it refuted its death).
        net.heal(2)
        for i in range(3):
            wait_for(lambda: all_alive(i), 60, f"h{i} sees h2 alive again")
        assert members(net, 0)["h2"]["incarnation"] > before
