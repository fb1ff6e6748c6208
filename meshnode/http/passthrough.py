"""Answer an inference request from a replica: here (the local engine) or on a peer.

Written once for both servers of a node: the front (front.py, the public port's fast path)
and the aiohttp apps (connections the front handed over, the signed cluster's internal
listener). Each gives a `Call` (what is known of the request) and a `Sink` (how to answer).

A request is tried on the router's targets in order (generative ones by their prompt
prefix's assignment; the replica that serves one records its prefix for gossip). A peer is
sent the raw body on the same path with `X-Meshnode-Hop: 1; cap=N` (the router's load cap:
the peer refuses with 503 `replica_busy` when its replica already holds N requests, since
only it knows its count exactly), or `X-Meshnode-Hop: 1` on the last try, which the peer
must serve; `; spill` is added when the peer is not the request's owner (it claims no
prefix). A request that carries the hop header (or came in on the internal listener) is
served here or refused, never forwarded again, so a stale view cannot bounce a request
around the mesh. Before the first byte of an answer, a connection failure or a 503 from a
peer moves on to the next target (at most one try per ready replica; a peer that could not be
connected to is skipped by later requests until it can be: node/reach.py); after it, bytes
pass through as they come (streams chunk by chunk, no re-encoding). A client that
goes away cancels the task running `dispatch`, which closes the upstream connection, which
cancels the peer's handler and its engine's generation.

In a signed cluster the forwarder checks that the certificate that answered is the target
node's before passing a peer's answer on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog

from meshnode.engines import InvalidRequest
from meshnode.node import ModelUnavailable, Node, Replica, Target

from .splice import Spliced, splice
from .upstream import Unreachable, Upstream, UpstreamError, UpstreamResponse

__all__ = ["HOP_HEADER", "PREFIX_PATHS", "Call", "Sink", "dispatch", "effective_hop",
           "forward_headers", "hop_params",
           "tls_check", "upstream_lost_event"]

log = structlog.get_logger("meshnode.http")

HOP_HEADER = "X-Meshnode-Hop"
_HOP = HOP_HEADER.encode()
PREFIX_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Generative routes: routed by their prompt prefix, and recorded in the serving replica's
prefix ledger (a KV cache to reuse); embeddings and rerank have none."""

_encode = msgspec.json.Encoder().encode
_PASS_HEADERS = (("x-served-by", "X-Served-By"), ("retry-after", "Retry-After"),
                 ("cache-control", "Cache-Control"))
_CRASHED = b"data: " + _encode({"error": {
    "message": "the engine stopped while streaming; retry the request",
    "type": "server_error", "param": None, "code": "engine_crashed"}}) + b"\n\n"
_UPSTREAM_DOWN = (UpstreamError, OSError)
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Sink(Protocol):
    """Where an answer goes: either one whole response, or a stream opened, written, closed.
    `write` returns once the client can take more (backpressure).

    A sink over a raw client socket (the front's) also offers `transport`, so a peer's answer
    can be spliced through as it arrives (splice.py): `extra_head` is inserted in the
    answer's head, `on_source` learns the upstream transport (to pause it when the client is
    slow), and `spliced` is told how it ended. Others set `transport` to None."""

    transport: asyncio.Transport | None
    extra_head: bytes

    def on_source(self, source: asyncio.Transport | None) -> None: ...

    def spliced(self, keep_alive: bool) -> None: ...

    async def respond(self, status: int, headers: dict[str, str], body: bytes) -> None: ...

    async def open(self, status: int, headers: dict[str, str]) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class Call:
    """One inference request as the dispatcher needs it."""

    __slots__ = ("authorization", "engines", "hop", "node", "peers", "rid")

    def __init__(self, node: Node, rid: str, peers: Upstream | None, engines: Upstream, *,
                 hop: str | None, authorization: str | None) -> None:
        self.node = node
        self.rid = rid
        self.peers = peers
        """The pool of connections to peer nodes (with the mTLS context when signed); None
        where nothing is forwarded (the internal listener)."""
        self.engines = engines
        """The pool of connections to this node's engine processes."""
        self.hop = hop
        """Forwarded to us (the hop header's value, in an open cluster or on the internal
        listener, where it may be "" for a peer that sent none): served here, never
        forwarded again. None: routed from here."""
        self.authorization = authorization
        """Passed on to peers: set only in an open cluster that requires API keys."""

    @property
    def served_here(self) -> bool:
        return self.hop is not None


def effective_hop(mode: str, hop: str | None) -> str | None:
    """Call.hop for a request that came with hop header value `hop` to a server in `mode`
    (forward.HOP_MODE): honoured in an open cluster, ignored on a signed cluster's public
    port (a client could skip routing), implied on its internal listener."""
    if mode == "internal":
        return hop or ""
    return (hop or None) if mode == "open" else None


def hop_params(hop: str) -> tuple[int | None, bool]:
    """(cap, spill) of a hop header value: "1", then optionally "; cap=N" (N >= 1: refuse
    at N in flight; none: the last try, serve whatever the load), then optionally "; spill"
    (sent to another replica than the owner: claim no prefix). "" (the internal listener,
    no header) is plain "1". InvalidRequest for anything else."""
    parts = hop.split("; ") if hop else ["1"]
    cap: int | None = None
    spill = parts[-1] == "spill" and len(parts) > 1
    if spill:
        parts.pop()
    if len(parts) == 2 and parts[1].startswith("cap="):
        n = parts.pop()[4:]
        if n.isascii() and n.isdigit() and len(n) <= 9 and int(n) > 0:
            cap = int(n)
        else:
            parts.append("bad")
    if parts != ["1"]:
        raise InvalidRequest(f"header {HOP_HEADER}: {hop[:40]!r} is not '1' [; cap=N] "
                             "[; spill] with N >= 1 (meshnode nodes send it to each other)")
    return cap, spill


async def dispatch(call: Call, name: str, path: str, body: bytes, key: bytes,
                   sink: Sink, exclude: str | None = None) -> None:
    """Answer the request for deployment `name` (routing `key`) into `sink`, trying every
    target but node `exclude` (one that already failed). Raises the node's or the engines'
    errors when nothing was sent yet (no replica, engine crashed)."""
    node = call.node
    prefix = path in PREFIX_PATHS
    if call.hop is not None:
        replica = node.serve(name, key, prefix, *hop_params(call.hop))
        return await relay(call, replica, path, body, sink)
    targets, cap, owner = node.route(name, key, prefix)
    targets = [t for t in targets if t.node_id != exclude]
    last: ModelUnavailable | None = None
    for i, target in enumerate(targets):
        final = i == len(targets) - 1
        spill = target.node_id != owner
        if target.local:
            replica = node.replicas.get(name)
            if not final and (replica is None or replica.state != "ready"
                              or replica.in_flight >= cap):
                continue  # gone since the route was computed, or full: try the next one
            return await relay(call, node.serve(name, key, prefix, None, spill), path, body,
                               sink)
        if await _forward(call, name, target, path, body, None if final else cap, spill,
                          sink):
            return None
        last = ModelUnavailable(f"model {name!r}: no replica answered; retry shortly")
    raise last or ModelUnavailable(f"model {name!r} has no ready replica; retry shortly")


async def relay(call: Call, replica: Replica, path: str, body: bytes, sink: Sink) -> None:
    """Pass the request to the local engine's OpenAI server and its answer back."""
    rid = call.rid
    out = {"X-Request-Id": rid, "X-Served-By": call.node.name}
    replica.in_flight += 1
    try:
        try:
            upstream = await call.engines.request(
                "POST", replica.address(), path, body,
                {"X-Request-Id": rid, "Content-Type": "application/json"})
        except _UPSTREAM_DOWN as exc:
            raise replica.process.crashed() if replica.process else exc from exc
        async with upstream:
            if upstream.content_type != "text/event-stream":
                try:
                    data = await upstream.read()
                except _UPSTREAM_DOWN as exc:
                    raise replica.process.crashed() if replica.process else exc from exc
                if "retry-after" in upstream.headers:
                    out["Retry-After"] = upstream.headers["retry-after"]
                out["Content-Type"] = upstream.headers.get("content-type", "application/json")
                return await sink.respond(upstream.status, out, data)
            await sink.open(upstream.status, {**out, **_SSE})
            tail = b""
            try:
                async for chunk in upstream.iter_chunks():
                    await sink.write(chunk)
                    tail = (tail + chunk)[-512:]
            except _UPSTREAM_DOWN:
                pass
            # A stream ends with [DONE] or an error event; an engine that died between two
            # chunks may look like a clean end of body, so check what the last event was.
            last = tail.rstrip(b"\n").rpartition(b"\n\n")[2]
            if last != b"data: [DONE]" and not last.startswith(b'data: {"error"'):
                await sink.write(_CRASHED)
            return await sink.close()
    finally:
        replica.in_flight -= 1


def _peer_ok(node: Node, upstream: UpstreamResponse, target: Target) -> bool:
    """In a signed cluster: did the target node's own, unrevoked certificate answer?"""
    return _peer_tls_ok(node, upstream.ssl_object, target)


def _peer_tls_ok(node: Node, ssl_object: object, target: Target) -> bool:
    if node.security is None:
        return True
    try:
        node.peers.verify(ssl_object, target.node_id)
    except Exception as exc:  # noqa: BLE001 - the security layer's errors: refuse the peer
        log.warning("forward.peer_refused", node=target.name, error=str(exc))
        return False
    return True


def forward_headers(rid: str, authorization: str | None, cap: int | None,
                    spill: bool = False) -> bytes:
    """The header lines (encoded) a request is forwarded to a peer with: the hop header,
    its request id `rid` (request_id: a token) and, in an open cluster that requires API
    keys, the client's `authorization` (a header value as read: no line break); `cap`:
    the load cap the peer refuses at (None on the last try, which the peer serves whatever
    its load); `spill`: the peer is not the request's owner, so it claims no prefix
    (hop_params)."""
    lines = b"%s: 1%s%s\r\nX-Request-Id: %s\r\nContent-Type: application/json\r\n" % (
        _HOP, b"" if cap is None else b"; cap=%d" % cap, b"; spill" if spill else b"",
        rid.encode())
    if authorization is not None:
        lines += b"Authorization: %s\r\n" % authorization.encode("latin-1")
    return lines


def tls_check(node: Node, target: Target) -> Callable[[object], bool] | None:
    """For splice(): in a signed cluster, whether a connection's TLS peer is `target`."""
    if node.security is None:
        return None
    return lambda ssl_object: _peer_tls_ok(node, ssl_object, target)


def upstream_lost_event(target: Target) -> bytes:
    """The last SSE event of a stream whose peer went away between two chunks."""
    return b"data: " + _encode({"error": {
        "message": f"node {target.name} went away while streaming; retry the request",
        "type": "server_error", "param": None, "code": "upstream_lost"}}) + b"\n\n"


async def _forward(call: Call, name: str, target: Target, path: str, body: bytes,
                   cap: int | None, spill: bool, sink: Sink) -> bool:
    """Pass the peer's answer on (True), or False to try the next target: it failed before
    its first byte (unreachable, or 503 when others remain, i.e. `cap` is set)."""
    final = cap is None
    headers = forward_headers(call.rid, call.authorization, cap, spill)
    assert call.peers is not None, "a Call that may forward needs the peers' pool"
    router = call.node.router
    router.sent(name, target.node_id)
    try:
        if sink.transport is not None:
            return await _splice(call, target, path, body, headers, final, sink)
        try:
            upstream = await call.peers.request("POST", target.url, path, body, headers,
                                                movable=not final)
        except UpstreamError as exc:
            log.info("forward.failed", node=target.name, error=str(exc))
            if isinstance(exc, Unreachable):
                call.node.peers.reach.failed(target.node_id, target.name, target.url)
            return False
        try:
            if not _peer_ok(call.node, upstream, target):
                return False
            if upstream.status == 503 and not final:
                log.info("forward.unavailable", node=target.name)
                return False
            got = upstream.headers
            out = {"X-Request-Id": call.rid}
            for h, name in _PASS_HEADERS:
                if h in got:
                    out[name] = got[h]
            if upstream.content_type != "text/event-stream":
                try:
                    data = await upstream.read()
                except UpstreamError as exc:
                    log.info("forward.failed", node=target.name, error=str(exc))
                    return False
                out["Content-Type"] = got.get("content-type", "application/json")
                upstream.release()
                await sink.respond(upstream.status, out, data)
                return True
            await sink.open(upstream.status, {**out, **_SSE})
            try:
                async for chunk in upstream.iter_chunks():
                    await sink.write(chunk)
            except UpstreamError:
                await sink.write(upstream_lost_event(target))
            upstream.release()
            await sink.close()
            return True
        finally:
            upstream.close()  # unless released above: the peer must see us go away
    finally:
        router.answered(name, target.node_id)


async def _splice(call: Call, target: Target, path: str, body: bytes, headers: bytes,
                  final: bool, sink: Sink) -> bool:
    """_forward's way for a sink over a raw socket: the peer's answer, head included, is
    written to the client as it arrives (the peer already set X-Request-Id, X-Served-By)."""
    assert call.peers is not None and sink.transport is not None
    done: Spliced = await splice(
        call.peers, "POST", target.url, path, body, headers, sink.transport,
        extra_head=sink.extra_head,
        retry_503=not final, check=tls_check(call.node, target), on_source=sink.on_source)
    match done.outcome:
        case "done":
            sink.spliced(done.keep_alive)
            return True
        case "broken":
            sink.spliced(False)
            if done.at_boundary:  # between two chunks: end the stream with an error event
                await sink.write(upstream_lost_event(target))
                await sink.close()
            log.info("forward.broken", node=target.name, request_id=call.rid)
            return True
        case "retry":
            log.info("forward.unavailable", node=target.name, request_id=call.rid)
        case "unreachable":
            log.info("forward.failed", node=target.name, outcome="unreachable",
                     request_id=call.rid)
            call.node.peers.reach.failed(target.node_id, target.name, target.url)
        case outcome:
            log.info("forward.failed", node=target.name, outcome=outcome, request_id=call.rid)
    return False
