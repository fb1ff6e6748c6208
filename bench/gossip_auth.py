"""CPU cost of gossip packet authentication and of mTLS, on one core, in one run.

    python bench/gossip_auth.py [--seconds 0.5] [--size 1024] [--handshakes 300]

Prints one JSON line, then a table with ratios. Measured:
- seal/open of a `--size` byte gossip packet with PacketSealer (AES-256-GCM) versus the same
  header framing without authentication (struct pack/unpack and a copy);
- open() of forged packets: a known sender with a random ciphertext (worst case: the AES-GCM tag
  check runs), an unknown sender (a dict miss), a replayed genuine packet (refused before the
  AEAD); reported as packets/s one core can reject;
- one Ed25519 verify of the same packet, for comparison (what signing each packet would cost);
- asyncio on loopback, sequential: mutual-TLS connect + handshake (Ed25519 certificates,
  TLS 1.3) versus a plain TCP connect. Client and server run in this one process, so
  handshakes/s counts both ends' CPU.
Each rate is the best of three runs of about `--seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    from meshnode.mesh.certs import init_ca, issue_node_bundle
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from meshnode.mesh.certs import init_ca, issue_node_bundle
import contextlib

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnode.mesh.identity import NodeIdentity
from meshnode.mesh.packet_auth import HEADER_LEN, PacketSealer
from meshnode.mesh.tls import client_context, server_context

_PLAIN = struct.Struct(">BB4s8sQ")


def rate(make_call: Callable[[], Callable[[], object]], seconds: float, batch: int = 1000) -> float:
    """Best calls/s of three runs; `make_call()` gives a fresh zero-argument call per run."""
    best = 0.0
    for _ in range(3):
        call = make_call()
        done, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(batch):
                call()
            done += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
    return best


def packet_rates(seconds: float, size: int) -> dict[str, float]:
    a_id, b_id = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    a, b = PacketSealer(a_id), PacketSealer(b_id)
    offer = a.offer(b_id)
    a.complete(b_id, b.accept(a_id, offer))
    payload = os.urandom(size)
    short = b"\x00" * 8

    def plain_seal() -> Callable[[], object]:
        counter = iter(range(1, 1 << 62))
        return lambda: _PLAIN.pack(1, 0, b"kkkk", short, next(counter)) + payload

    def plain_open() -> Callable[[], object]:
        packet = _PLAIN.pack(1, 0, b"kkkk", short, 1) + payload
        return lambda: (_PLAIN.unpack_from(packet), packet[HEADER_LEN:])

    def auth_seal() -> Callable[[], object]:
        return lambda: a.seal(b_id, payload)

    def auth_open_rate(n: int = 100_000) -> float:
        best = 0.0
        for _ in range(3):
            packets = [a.seal(b_id, payload) for _ in range(n)]
            start = time.perf_counter()
            for packet in packets:
                b.open(packet)
            best = max(best, n / (time.perf_counter() - start))
        return best

    signer = Ed25519PrivateKey.generate()
    signature, public = signer.sign(payload), signer.public_key()
    out = {
        "plain_seal_per_s": rate(plain_seal, seconds),
        "plain_open_per_s": rate(plain_open, seconds),
        "auth_seal_per_s": rate(auth_seal, seconds),
        "auth_open_per_s": auth_open_rate(),
    }
    genuine = a.seal(b_id, payload)
    assert b.open(genuine) is not None
    forged_known = (
        genuine[:14] + (1 << 40).to_bytes(8, "big") + os.urandom(len(genuine) - HEADER_LEN)
    )
    forged_unknown = genuine[:6] + os.urandom(8) + genuine[14:]
    out |= {
        "forged_known_sender_reject_per_s": rate(lambda: lambda: b.open(forged_known), seconds),
        "forged_unknown_sender_reject_per_s": rate(lambda: lambda: b.open(forged_unknown), seconds),
        "replay_reject_per_s": rate(lambda: lambda: b.open(genuine), seconds),
        "ed25519_verify_per_s": rate(
            lambda: lambda: public.verify(signature, payload), seconds, 100
        ),
    }
    assert b.rejected["auth"] > 0 and b.rejected["unknown_peer"] > 0 and b.rejected["replay"] > 0
    return out


async def connect_rates(handshakes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        ca = init_ca(tmp, "bench", None, allow_unencrypted=True)
    srv_node, cli_node = issue_node_bundle(ca, "server"), issue_node_bundle(ca, "client")
    server_ctx = server_context(srv_node.cert, srv_node.private_key, ca.cert)
    client_ctx = client_context(cli_node.cert, cli_node.private_key, ca.cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    async def run(ssl_ctx: ssl.SSLContext | None) -> float:
        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=server_ctx if ssl_ctx else None
        )
        port = server.sockets[0].getsockname()[1]
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(handshakes):
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
            best = max(best, handshakes / (time.perf_counter() - start))
        server.close()
        await server.wait_closed()
        return best

    return {"tcp_connect_per_s": await run(None), "mtls_handshake_per_s": await run(client_ctx)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--handshakes", type=int, default=300)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    r = packet_rates(args.seconds, args.size) | asyncio.run(connect_rates(args.handshakes))
    us = {k: 1e6 / v for k, v in r.items()}
    ratios = {
        "seal_auth_over_plain": r["plain_seal_per_s"] / r["auth_seal_per_s"],
        "open_auth_over_plain": r["plain_open_per_s"] / r["auth_open_per_s"],
        "ed25519_verify_over_forged_reject": r["forged_known_sender_reject_per_s"]
        / r["ed25519_verify_per_s"],
        "mtls_over_tcp_connect": r["tcp_connect_per_s"] / r["mtls_handshake_per_s"],
    }
    print(
        json.dumps(
            {
                "bench": "gossip_auth",
                "size": args.size,
                "python": platform.python_version(),
                "openssl": ssl.OPENSSL_VERSION,
                "machine": platform.machine(),
                "per_s": {k: round(v, 1) for k, v in r.items()},
                "us": {k: round(v, 3) for k, v in us.items()},
                "ratios": {k: round(v, 2) for k, v in ratios.items()},
            }
        )
    )
    print(f"\n{'operation (' + str(args.size) + ' B packet)':<40} {'per s':>12} {'us each':>10}")
    for key, value in r.items():
        print(f"{key.removesuffix('_per_s'):<40} {value:>12,.0f} {us[key]:>10.2f}")
    print()
    print(f"seal:  authenticated costs {ratios['seal_auth_over_plain']:.1f}x plain framing")
    print(f"open:  authenticated costs {ratios['open_auth_over_plain']:.1f}x plain framing")
    print(
        f"forged packet (worst case) is {ratios['ed25519_verify_over_forged_reject']:.0f}x cheaper "
        f"to reject than one Ed25519 verify"
    )
    print(
        f"mTLS connect+handshake costs {ratios['mtls_over_tcp_connect']:.1f}x a plain TCP connect"
    )


if __name__ == "__main__":
    main()
