"""Invites: the CA holder's redemption listener, and the admin route that makes tokens.

A node holds the CA when `ca_dir` (default `<data_dir>/ca`) has a CA key; it loads it at start
(passphrase from MESHNODE_CA_PASSPHRASE or the file named by MESHNODE_CA_PASSPHRASE_FILE) and
serves, over TLS 1.3 on `invite_port` (protocol in mesh/invite.py):
- GET  /join/ca  the CA certificate (public; the joiner checks it against the token's pin);
- POST /join     a JoinRequest (msgpack) -> JoinResponse: the invite is redeemed once, then a
                 certificate for the joiner's key is issued.
The listener's own certificate is issued at start by the CA for this node's key (no client
certificate is asked for: joiners have none yet). It is a separate listener rather than a
route of the internal one because it must accept clients without certificates, which the
internal listener (fail closed) never does.

POST /v1/cluster/invites {"ttl_s", "roles", "address"} (admin) returns a one-time token whose
address is this listener (`address` overrides it, e.g. behind NAT).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import structlog
from aiohttp import web
from msgspec import Meta

from meshnode.engines import decode_request
from meshnode.mesh.certs import CA_KEY_FILE, ClusterCA, issue_node_cert, load_ca
from meshnode.mesh.certverify import certificate_pem
from meshnode.mesh.crypto_errors import (
    InviteError,
    InviteExpiredError,
    InviteFormatError,
    InviteUsedError,
    SecurityError,
)
from meshnode.mesh.invite import InviteStore, create_invite, handle_join_request
from meshnode.mesh.tls import server_context
from meshnode.node import ConfigError, InvalidDeployment, Node

from .errors import error_response
from .keys import NODE

__all__ = ["INVITES", "InviteService", "invite_ctx", "routes"]

log = structlog.get_logger("meshnode.http")

JOIN_CA_PATH = "/join/ca"
JOIN_PATH = "/join"
INVITES_FILE = "invites.json"
routes = web.RouteTableDef()


@dataclass
class InviteService:
    ca: ClusterCA
    store: InviteStore
    address: str
    """host:port joiners dial (the redemption listener)."""


INVITES = web.AppKey("invites", InviteService)


class InviteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ttl_s: Annotated[float, Meta(gt=0, le=30 * 86400)] = 3600.0
    roles: tuple[str, ...] = ()
    address: str | None = None


def ca_passphrase() -> bytes | None:
    """From MESHNODE_CA_PASSPHRASE, else the file MESHNODE_CA_PASSPHRASE_FILE names; else None."""
    if os.environ.get("MESHNODE_CA_PASSPHRASE"):
        return os.environ["MESHNODE_CA_PASSPHRASE"].encode()
    path = os.environ.get("MESHNODE_CA_PASSPHRASE_FILE")
    if path:
        try:
            return Path(path).read_text().rstrip("\r\n").encode()
        except OSError as exc:
            raise ConfigError(f"MESHNODE_CA_PASSPHRASE_FILE: {exc}") from None
    return None


def _advertised_host(node: Node) -> str:
    host = node.config.advertise_addr.rpartition(":")[0] if ":" in node.config.advertise_addr \
        else node.config.advertise_addr
    host = host or node.config.host
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return ""
    except ValueError:
        pass
    return host


def _join_app(service: InviteService) -> web.Application:
    async def ca_cert(request: web.Request) -> web.Response:
        return web.Response(body=certificate_pem(service.ca.cert),
                            content_type="application/x-pem-file")

    async def join(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            answer = await asyncio.to_thread(handle_join_request, service.ca, service.store,
                                             body)
        except InviteFormatError as exc:
            return error_response(400, f"{exc}", code="invite_malformed")
        except InviteError as exc:
            code = ("invite_used" if isinstance(exc, InviteUsedError) else "invite_expired"
                    if isinstance(exc, InviteExpiredError) else "invite_unknown")
            log.info("invite.refused", reason=code, peer=request.remote)
            return error_response(403, f"{exc}: ask the cluster admin for a new one "
                                       "(`meshnode invite`)", code=code)
        return web.Response(body=answer, content_type="application/msgpack")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get(JOIN_CA_PATH, ca_cert)
    app.router.add_post(JOIN_PATH, join)
    return app


async def invite_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the node's): serve redemption if this node holds the CA."""
    node = app[NODE]
    ca_dir = Path(node.config.ca_dir or node.data_dir / "ca")
    if not (ca_dir / CA_KEY_FILE).is_file():
        if node.config.ca_dir:
            raise ConfigError(f"no CA key in --ca-dir {ca_dir}: `meshnode ca init --dir "
                              f"{ca_dir}` makes one")
        yield
        return
    try:
        ca = await asyncio.to_thread(load_ca, ca_dir, ca_passphrase())
    except SecurityError as exc:
        raise ConfigError(f"cannot load the cluster CA in {ca_dir}: {exc}; set "
                          "MESHNODE_CA_PASSPHRASE (or MESHNODE_CA_PASSPHRASE_FILE)") from None
    assert node.identity is not None
    cert = issue_node_cert(ca, node.identity.public_key, node.name, days=365,
                           now=dt.datetime.now(dt.UTC))
    ctx = server_context(cert, node.identity.private_key, ca.cert, require_client_cert=False)
    store = InviteStore(ca_dir / INVITES_FILE)
    runner = web.AppRunner(_join_app(InviteService(ca, store, "")), access_log=None,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, node.config.host, node.config.invite_port, ssl_context=ctx)
        await site.start()
        port = runner.addresses[0][1]
        host = _advertised_host(node)
        app[INVITES] = InviteService(ca, store, f"{host}:{port}" if host else "")
        log.info("invite.listening", port=port, cluster=ca.cluster_id)
        yield
    finally:
        await runner.cleanup()


@routes.post("/v1/cluster/invites")
async def make_invite(request: web.Request) -> web.Response:
    req = decode_request(await request.read(), InviteRequest)
    service = request.app.get(INVITES)
    if service is None:
        raise InvalidDeployment("this node holds no cluster CA: ask the node started with "
                                "--ca-dir (or with a CA in <data dir>/ca)")
    address = req.address or service.address
    if not address:
        raise InvalidDeployment("this node binds 0.0.0.0: give the address joiners dial, "
                                "e.g. `meshnode invite --address HOST:PORT`", param="address")
    try:
        token = await asyncio.to_thread(create_invite, service.ca, address, req.ttl_s,
                                        store=service.store, roles=req.roles)
    except ValueError as exc:
        raise InvalidDeployment(str(exc)) from None
    expires = int(req.ttl_s)
    return web.Response(body=msgspec.json.encode({"token": token, "address": address,
                                                  "expires_in_s": expires,
                                                  "cluster_id": service.ca.cluster_id}),
                        status=201, content_type="application/json")
