"""A flood of forged gossip packets at one node of a signed 3-node cluster: its CPU, and whether
membership stays correct.

Three real `meshnode start` processes on loopback, signed by a CA made in a tmp dir (sealed
gossip, mTLS push-pull), joined by --join. Two windows of `--seconds` each, in one run:

    idle    nothing but the cluster's own gossip
    flood   `--rate` forged datagrams/s at node a's gossip port, a mix of:
            garbage (short), a real member's sender id with a wrong key id (dict hit, key-id
            miss), and random ciphertext under a real sender (UNKNOWN_KEY as well: the forger
            cannot see the current key id without sniffing the wire)

Measured for node a: CPU = (utime + stime delta) / wall, from /proc/<pid>/stat; datagrams the
kernel dropped at its gossip socket (/proc/net/udp: receive buffer full); and on every
node, MemberSuspected events (`member.suspect` log lines) during each window: any is a false
suspicion, as no node is really down. The forger runs in this process, paced in 10 ms batches.

    python bench/gossip_flood.py [--seconds 10] [--rate 10000] [--preset local]

Prints one JSON line, then a table. Target: flood CPU of node a well under one core, and zero
suspicions during the flood.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import NodeProcess, get_json

from meshnode.mesh.certs import init_ca, issue_node_cert
from meshnode.mesh.certverify import certificate_pem
from meshnode.mesh.identity import NodeIdentity, short_key_id

CLK_TCK = os.sysconf("SC_CLK_TCK")
ENV = {"MESHNODE_API_KEYS": "off"}


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def suspicions(nodes: list[NodeProcess]) -> list[str]:
    """Every suspicion so far, as "local suspects node" (from the JSON logs)."""
    out = []
    for n in nodes:
        for line in n.log_path.read_text().splitlines():
            if '"member.suspect"' in line:
                event = json.loads(line)
                out.append(f"{event.get('local')} suspects {str(event.get('node'))[:8]}")
    return out


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to `port` (receive buffer full)."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[-1])
    return 0


def forged(sender: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 38))  # shorter than header + tag
    body = rng.randbytes(rng.randrange(64, 512))
    return bytes([1, 0]) + rng.randbytes(4) + (sender if kind == 1 else rng.randbytes(8)) + \
        rng.randrange(1, 2**63).to_bytes(8, "big") + body


def window(pid: int, seconds: float, flood: tuple[str, int] | None, rate: int,
           sender: bytes) -> tuple[float, int]:
    """(CPU fraction of `pid` over the window, datagrams sent)."""
    rng = random.Random(7)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    start_cpu, start = cpu_s(pid), time.monotonic()
    per_batch = max(1, rate // 100)
    try:
        while (now := time.monotonic()) - start < seconds:
            if flood is not None:
                due = int((now - start) * rate)
                while sent < due:
                    for _ in range(min(per_batch, due - sent)):
                        udp.sendto(forged(sender, rng), flood)
                        sent += 1
            time.sleep(0.01)
    finally:
        udp.close()
    wall = time.monotonic() - start
    return (cpu_s(pid) - start_cpu) / wall, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--preset", choices=["lan", "local"], default="local")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-flood-"))
    nodes: list[NodeProcess] = []
    try:
        ca = init_ca(tmp / "ca", "bench", None, allow_unencrypted=True)
        (tmp / "ca.pem").write_bytes(certificate_pem(ca.cert))
        ids = {}
        for name in ("a", "b", "c"):
            identity = NodeIdentity.load_or_create(tmp / name)
            ids[name] = identity.node_id
            (tmp / f"{name}.crt").write_bytes(certificate_pem(
                issue_node_cert(ca, identity.public_key, name)))
            extra = ["--join", nodes[0].gossip] if nodes else []
            nodes.append(NodeProcess(
                tmp / name, "--name", name, "--mesh-preset", args.preset, "--ca",
                str(tmp / "ca.pem"), "--cert", str(tmp / f"{name}.crt"), "--internal-port", "0",
                "--no-mdns", *extra, env=ENV))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(sum(m["state"] == "alive" for m in get_json(n.url + "/v1/cluster/nodes")
                       ["data"]) == 3 for n in nodes):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("cluster did not form")
        time.sleep(2.0)  # settle: keys exchanged, first push-pulls done
        host, port = nodes[0].gossip.rsplit(":", 1)
        pid = nodes[0].proc.pid
        sender = short_key_id(ids["b"])
        s0 = suspicions(nodes)
        d0 = udp_drops(int(port))
        idle_cpu, _ = window(pid, args.seconds, None, args.rate, sender)
        s1 = suspicions(nodes)
        d1 = udp_drops(int(port))
        flood_cpu, sent = window(pid, args.seconds, (host, int(port)), args.rate, sender)
        time.sleep(1.0)  # a suspicion raised at the end of the flood shows up within a probe
        s2 = suspicions(nodes)
        d2 = udp_drops(int(port))
        members = [sorted((m["name"], m["state"]) for m in
                          get_json(n.url + "/v1/cluster/nodes")["data"]) for n in nodes]
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "bench": "gossip_flood", "preset": args.preset, "seconds": args.seconds,
        "rate_pps": args.rate, "sent": sent, "sent_pps": round(sent / args.seconds),
        "idle_cpu": round(idle_cpu, 4), "flood_cpu": round(flood_cpu, 4),
        "flood_vs_idle": round(flood_cpu / max(idle_cpu, 1e-4), 2),
        "cpu_us_per_forged": round((flood_cpu - idle_cpu) * args.seconds / max(sent, 1) * 1e6, 2),
        "suspicions_idle": len(s1) - len(s0), "suspicions_flood": len(s2) - len(s1),
        "suspected_in_flood": s2[len(s1):], "node_a": ids["a"][:8],
        "kernel_drops_idle": d1 - d0, "kernel_drops_flood": d2 - d1,
        "members_after_all_alive": all(all(s == "alive" for _, s in m) for m in members),
    }
    print(json.dumps(result))
    print(f"\n{'window':8} {'CPU of a':>10} {'suspicions':>11}")
    print(f"{'idle':8} {result['idle_cpu']:>10.3f} {result['suspicions_idle']:>11}")
    print(f"{'flood':8} {result['flood_cpu']:>10.3f} {result['suspicions_flood']:>11}")
    print(f"\nflood/idle CPU {result['flood_vs_idle']}x; "
          f"{result['cpu_us_per_forged']} us of CPU per forged datagram "
          f"({result['sent_pps']} sent/s)")


if __name__ == "__main__":
    main()
