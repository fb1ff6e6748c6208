"""mDNS discovery between hosts in network namespaces (root only), and record parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import netns
from meshnode.mesh.discovery import Discovery

PROBE = str(Path(__file__).with_name("discovery_probe.py"))


@pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))
def test_three_hosts_find_each_other_and_ignore_other_clusters() -> None:
    with netns.Net(4) as net:
        clusters = ["blue", "blue", "blue", "red"]
        procs = [net.popen(i, [sys.executable, PROBE, net.ips[i], f"n{i}", clusters[i], "8"],
                           stdout=subprocess.PIPE, text=True) for i in range(4)]
        results = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1])
                   for p in procs]
    for i in range(3):
        found = results[i]["found"]
        assert set(found) == {f"n{j}" for j in range(3) if j != i}, results[i]
        assert all(v["host"] == net.ips[int(k[1:])] for k, v in found.items())
        assert results[i]["stats"].get("other_cluster", 0) >= 1
    assert results[3]["found"] == {}


def _info(props: dict[bytes, bytes], addresses: list[str]) -> SimpleNamespace:
    return SimpleNamespace(properties=props, parsed_addresses=lambda version: addresses)


GOOD = {b"v": b"1", b"c": b"c", b"n": b"id", b"g": b"7701", b"h": b"7700", b"p": b"1"}


def test_parse_accepts_a_good_record() -> None:
    found = Discovery.parse(_info(GOOD, ["10.0.0.5"]))  # type: ignore[arg-type]
    assert found is not None and (found.host, found.gossip_port) == ("10.0.0.5", 7701)


@pytest.mark.parametrize(("props", "addresses"), [
    ({**GOOD, b"g": b"x"}, ["10.0.0.5"]),
    ({**GOOD, b"g": b"70000"}, ["10.0.0.5"]),
    ({k: v for k, v in GOOD.items() if k != b"n"}, ["10.0.0.5"]),
    (GOOD, []),
    (GOOD, ["0.0.0.0"]),
    (GOOD, ["224.0.0.251"]),
])
def test_parse_rejects_malformed_records(props: dict, addresses: list[str]) -> None:
    assert Discovery.parse(_info(props, addresses)) is None  # type: ignore[arg-type]


def test_refuses_unspecified_bind_address() -> None:
    with pytest.raises(ValueError, match="concrete interface"):
        Discovery(node_id="a", cluster="c", bind_ip="0.0.0.0", gossip_port=1, http_port=2,
                  protocol=1, on_found=lambda f: None)
