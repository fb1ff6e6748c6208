"""Invites: `meshnode invite` asks the CA holder for a token; `meshnode start --token T`
redeems it before the node starts (protocol in mesh/invite.py):

1. refuse a damaged or expired token before connecting;
2. GET the CA certificate over unverified TLS, check it against the token's pin;
3. POST the token's secret and this node's public key over TLS pinned to that CA;
4. check the answer (CA = pin, certificate verifies and carries our key) and store
   `<data_dir>/ca_cert.pem` and `<data_dir>/cert.pem`; the node then starts with them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from .client import AdminClient, CliError
from .keys import install_api_key, parse_duration

__all__ = ["add_invite_command", "redeem_token"]

_TIMEOUT_S = 30.0


def _call(address: str, ctx: ssl.SSLContext, method: str, path: str,
          body: bytes | None = None) -> bytes:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), context=ctx,
                                       timeout=_TIMEOUT_S)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/msgpack"} if body else {})
        resp = conn.getresponse()
        data = resp.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"cannot reach the inviting node at {address} ({exc}): is it running, "
                       "and is its invite port open to this machine?") from None
    finally:
        conn.close()
    if resp.status != 200:
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.reason
        raise CliError(f"the invite was refused: {message}")
    return data


def redeem_token(token: str, data_dir: str, name: str) -> tuple[str, str]:
    """Join with `token`; return the paths of the stored (CA certificate, node certificate)."""
    from meshnode.mesh.certverify import certificate_pem
    from meshnode.mesh.crypto_errors import InviteExpiredError, SecurityError
    from meshnode.mesh.identity import NodeIdentity
    from meshnode.mesh.invite import (
        accept_join_response,
        make_join_request,
        parse_invite,
        pinned_client_context,
    )
    from meshnode.mesh.securefile import replace_file
    from meshnode.mesh.tls import bootstrap_client_context

    try:
        invite = parse_invite(token, now=time.time())
    except InviteExpiredError:
        raise CliError("the invite token has expired: ask for a new one (`meshnode invite` on "
                       "the node holding the CA)") from None
    except SecurityError as exc:
        raise CliError(str(exc)) from None
    identity = NodeIdentity.load_or_create(data_dir)
    try:
        ca_pem = _call(invite.address, bootstrap_client_context(), "GET", "/join/ca")
        ctx = pinned_client_context(invite.ca_fingerprint, ca_pem)
        answer = _call(invite.address, ctx, "POST", "/join",
                       make_join_request(invite, identity.public_key_bytes, name))
        cert, ca_cert, info = accept_join_response(invite, answer, identity.public_key_bytes)
    except (SecurityError, ssl.SSLError) as exc:
        raise CliError(f"joining through {invite.address} failed: {exc}. The token may be "
                       "for another cluster, or someone is between us: check the address")\
            from None
    ca_path, cert_path = Path(data_dir, "ca_cert.pem"), Path(data_dir, "cert.pem")
    replace_file(ca_path, certificate_pem(ca_cert), 0o644)
    replace_file(cert_path, certificate_pem(cert), 0o644)
    print(f"meshnode: joined cluster {info.cluster_id} as node {info.node_id} "
          f"(certificate until {info.not_after:%Y-%m-%d})", flush=True)
    return str(ca_path), str(cert_path)


def _invite(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    if ttl is None:
        raise CliError("an invite must expire: give --ttl, e.g. 1h")
    body: dict[str, object] = {"ttl_s": ttl,
                               "roles": [r.strip() for r in (args.roles or "").split(",")
                                         if r.strip()]}
    if args.address:
        body["address"] = args.address
    install_api_key(args.api_key)
    answer = AdminClient(args.endpoint).request("POST", "/v1/cluster/invites", body)
    print(answer["token"])
    print(f"one-time invite to cluster {answer['cluster_id']}, valid {args.ttl}: on the new "
          f"machine run `meshnode start --token TOKEN` (it dials {answer['address']})",
          file=sys.stderr)
    return 0


def add_invite_command(sub: Any) -> None:
    """Register `invite` under the top-level subparsers `sub`."""
    p = sub.add_parser("invite", help="print a one-time token for a new node to join with")
    p.add_argument("--ttl", default="1h", metavar="DURATION", help="validity (default 1h)")
    p.add_argument("--roles", metavar="R1,R2", help="roles of the certificate it gets")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="where joiners dial the invite port (default: the node's own)")
    p.add_argument("--endpoint", help="the node holding the CA (default http://127.0.0.1:7700)")
    p.add_argument("--api-key", help="an admin key (default: MESHNODE_API_KEY)")
    p.set_defaults(func=_invite)
