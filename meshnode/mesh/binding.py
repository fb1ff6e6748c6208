"""The gossip port: one UDP socket and one TCP listener bound to the same port, and the
address to advertise when bound to a wildcard."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["bind_pair", "is_wildcard", "outbound_ip"]

_BIND_ATTEMPTS = 10  # port 0: tries to find one port free for both UDP and TCP


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def outbound_ip() -> str:
    """The local address of the default route (no packet is sent); loopback if none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A TCP listener and a UDP socket on the same port (port 0: a free one for both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            udp.bind((host, tcp.getsockname()[1]))
            tcp.setblocking(False)
            udp.setblocking(False)
            return tcp, udp
        except OSError as exc:
            tcp.close()
            udp.close()
            last = exc
    raise last if last is not None else OSError("bind failed")
