"""Hosts in network namespaces joined by a bridge, for tests that cross a network.

Root only. Layout: namespace `<prefix>br` holds bridge `br0`; each host namespace
`<prefix>hN` has `eth0` (fixed MAC) with 10.213.0.(10+N)/24, its peer enslaved to the bridge.
While a Net exists, the root namespace has a blackhole route for the test subnet, so no
packet for it can leave this machine from the root namespace. Processes in a namespace are
killed before the namespace is deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

SUBNET = "10.213.0.0/24"


def available() -> str | None:
    """None if namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


class Net:
    def __init__(self, hosts: int) -> None:
        self.prefix = "mn" + uuid.uuid4().hex[:6]
        self.bridge_ns = self.prefix + "br"
        self.hosts = [f"{self.prefix}h{i}" for i in range(hosts)]
        self.ips = [f"10.213.0.{10 + i}" for i in range(hosts)]
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Net":
        _run("ip", "route", "replace", "blackhole", SUBNET)
        try:
            _run("ip", "netns", "add", self.bridge_ns)
            # No IGMP snooping: with no querier on the bridge it can starve mDNS.
            self.exec_bridge("ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self.exec_bridge("ip", "link", "set", "br0", "up")
            for i, (ns, ip) in enumerate(zip(self.hosts, self.ips)):
                _run("ip", "netns", "add", ns)
                veth, peer = f"{self.prefix}v{i}", f"{self.prefix}p{i}"
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
                _run("ip", "link", "set", veth, "netns", ns)
                _run("ip", "link", "set", peer, "netns", self.bridge_ns)
                self.exec(i, "ip", "link", "set", veth, "name", "eth0")
                self.exec(i, "ip", "link", "set", "eth0", "address", f"02:00:00:00:00:{10 + i:02x}")
                self.exec(i, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
                self.exec(i, "ip", "link", "set", "eth0", "up")
                self.exec(i, "ip", "link", "set", "lo", "up")
                self.exec_bridge("ip", "link", "set", peer, "master", "br0")
                self.exec_bridge("ip", "link", "set", peer, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def exec(self, host: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.hosts[host], *args, check=check)

    def exec_bridge(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.bridge_ns, *args, check=check)

    def popen(self, host: int, argv: list[str], **kwargs: object) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[host], *argv],
                                **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def cut(self, host: int) -> None:
        """Silently drop everything to and from a host at the bridge (a partition)."""
        self.exec_bridge("ip", "link", "set", f"{self.prefix}p{host}", "down")

    def heal(self, host: int) -> None:
        self.exec_bridge("ip", "link", "set", f"{self.prefix}p{host}", "up")

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        for ns in [*self.hosts, self.bridge_ns]:
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)
        if not _others_running():
            _run("ip", "route", "del", "blackhole", SUBNET, check=False)


def _others_running() -> bool:
    out = _run("ip", "netns", "list", check=False).stdout
    return any(line.startswith("mn") for line in out.splitlines())
