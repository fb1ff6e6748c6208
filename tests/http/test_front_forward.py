"""The front's forwarding: retries before the first byte, splicing, pooling, cancellation.

A unit test of routing: the node is a test double whose `route` names real peer servers on
loopback (aiohttp apps answering 200, streams, 503, or a port that closes at once), and the
front runs on a real socket in front of the real aiohttp app. The end-to-end versions (real
nodes, real weights) are in tests/cluster/test_routing.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshnode.http import forward, openai_api
from meshnode.http.front import FrontSite
from meshnode.http.passthrough import Call, dispatch, effective_hop, hop_params
from meshnode.http.keys import NODE
from meshnode.engines import InvalidRequest
from meshnode.node import ModelUnavailable, NodeConfig, Router, Target
from meshnode.node.peers import PeerView

BODY = {"model": "m", "prompt": "hello", "max_tokens": 1}
CAP = 7


class FakeNode:
    """What the front and the dispatcher ask of a node, with a settable route."""

    def __init__(self) -> None:
        self.name = "entry"
        self.node_id = "entry-id"
        self.security = None
        self.config = NodeConfig(api_keys="off")
        self.router = Router()
        self.replicas: dict[str, Any] = {}
        self.targets: list[Target] = []
        self.peers = PeerView(lambda: self.node_id, lambda: None, None)  # no members

    def abilities(self, name: str) -> tuple[str, ...]:
        return ("chat", "completion")

    def checks(self, name: str) -> bool:
        return True  # an engine-host model

    def route(self, name: str, key: bytes, prefix: bool = True
              ) -> tuple[list[Target], int, str]:
        if not self.targets:
            raise ModelUnavailable(f"model {name!r} has no ready replica; retry shortly")
        return list(self.targets), CAP, self.targets[0].node_id  # the first is the owner

    def serve(self, name: str, key: bytes, prefix: bool, cap: int | None = None,
              spill: bool = False) -> Any:
        raise ModelUnavailable(f"no replica here (cap {cap}, spill {spill})")


async def _peer(name: str, seen: dict[str, Any], *, status: int = 200,
                keepalive_s: float = 75.0) -> tuple[web.AppRunner, str]:
    async def complete(request: web.Request) -> web.StreamResponse:
        seen.setdefault(name, []).append(request.headers.get("X-Meshnode-Hop"))
        body = await request.json()
        if body.get("x_bytes"):  # a large answer, its progress recorded
            resp = web.StreamResponse(headers={"X-Served-By": name})
            await resp.prepare(request)
            chunk = b"x" * 65536
            for _ in range(int(body["x_bytes"]) // len(chunk)):
                await resp.write(chunk)  # waits while the connection is above its high mark
                seen[f"{name} wrote"] = seen.get(f"{name} wrote", 0) + len(chunk)
            await resp.write_eof()
            return resp
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Served-By": name})
            await resp.prepare(request)
            try:
                for i in range(int(body.get("x_count", 3))):
                    await resp.write(f"data: {{\"i\": {i}}}\n\n".encode())
                    await asyncio.sleep(float(body.get("pause", 0)))
                await resp.write(b"data: [DONE]\n\n")
            except asyncio.CancelledError:
                seen.setdefault("cancelled", asyncio.Event()).set()
                raise
            return resp
        return web.json_response({"served": name}, status=status,
                                 headers={"X-Served-By": name})

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=keepalive_s)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def world() -> AsyncIterator[dict[str, Any]]:
    seen: dict[str, Any] = {}
    runners = []
    urls = {}
    for name, status, keepalive in (("good", 200, 75.0), ("busy", 503, 75.0),
                                    ("brief", 200, 0.3)):
        runner, url = await _peer(name, seen, status=status, keepalive_s=keepalive)
        runners.append(runner)
        urls[name] = url

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # accepts, then closes before answering

    dead = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    urls["dead"] = f"http://127.0.0.1:{dead.sockets[0].getsockname()[1]}"
    node = FakeNode()
    app = web.Application()
    app[NODE] = node  # type: ignore[misc]
    app.cleanup_ctx.append(forward.upstream_ctx)
    app.cleanup_ctx.append(forward.session_ctx())
    app.add_routes(openai_api.routes)
    front = web.AppRunner(app, handler_cancellation=True)
    await front.setup()
    await FrontSite(front, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{front.addresses[0][1]}"
    try:
        yield {"node": node, "urls": urls, "url": url, "seen": seen, "app": app}
    finally:
        await front.cleanup()
        node.peers.reach.close()
        dead.close()
        await dead.wait_closed()
        for runner in runners:
            await runner.cleanup()


def _targets(world: dict[str, Any], *names: str) -> None:
    world["node"].targets = [Target(f"{n}-id", n, world["urls"][n], False) for n in names]


async def _post(session: aiohttp.ClientSession, world: dict[str, Any],
                body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str]:
    async with session.post(world["url"] + "/v1/completions", json=body or BODY) as resp:
        return resp.status, json.loads(await resp.read()), resp.headers.get("X-Served-By", "")


async def test_503_then_next_replica(world: dict[str, Any]) -> None:
    _targets(world, "busy", "good")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # the first with fresh connections, then pooled ones
            assert await _post(s, world) == (200, {"served": "good"}, "good")
    # Every try but the last carries the router's cap, which the peer may refuse at; a try
    # sent to another replica than the owner (the first) is a spill, which claims no prefix.
    assert world["seen"]["busy"] == [f"1; cap={CAP}"] * 3
    assert world["seen"]["good"] == ["1; spill"] * 3
    assert not world["node"].router.forwarded  # every in-flight count went back to 0


async def test_the_last_replica_s_503_is_passed_on(world: dict[str, Any]) -> None:
    _targets(world, "busy")
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            assert await _post(s, world) == (503, {"served": "busy"}, "busy")


async def test_a_peer_that_hangs_up_is_skipped(world: dict[str, Any]) -> None:
    _targets(world, "dead", "good")
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            assert await _post(s, world) == (200, {"served": "good"}, "good")
    _targets(world, "dead")
    async with aiohttp.ClientSession() as s:
        status, body, _ = await _post(s, world)
    assert status == 503 and body["error"]["code"] == "model_loading"
    assert "no replica answered" in body["error"]["message"]


def _closed_port() -> str:
    """The URL of a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_a_peer_that_cannot_be_connected_to_is_reported_to_routing(
        world: dict[str, Any]) -> None:
    node, closed = world["node"], _closed_port()
    node.targets = [Target("closed-id", "closed", closed, False),
                    Target("good-id", "good", world["urls"]["good"], False)]
    async with aiohttp.ClientSession() as s:  # the front's path: spliced
        assert await _post(s, world) == (200, {"served": "good"}, "good")
    assert node.peers.reach.down == {"closed-id": closed}
    node.peers.reach.forget("closed-id")

    class Sink:  # a sink without a socket (the aiohttp apps'): the request/response path
        transport = None
        extra_head = b""
        answer: tuple[int, bytes] | None = None

        async def respond(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.answer = (status, body)

    pool = world["app"][forward.FORWARD_UPSTREAM]
    sink = Sink()
    call = Call(node, "rid", pool, world["app"][forward.ENGINE_UPSTREAM], hop=None,
                authorization=None)
    await dispatch(call, "m", "/v1/completions", json.dumps(BODY).encode(), b"k",
                   sink)  # type: ignore[arg-type]
    assert sink.answer == (200, b'{"served": "good"}')
    assert node.peers.reach.down == {"closed-id": closed}
    # A peer that accepts and hangs up was reached: it is not reported.
    _targets(world, "dead", "good")
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, world))[0] == 200
    assert "dead-id" not in node.peers.reach.down


async def test_no_route_is_the_apps_error(world: dict[str, Any]) -> None:
    _targets(world)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await _post(s, world)
    assert status == 503 and body["error"]["type"] == "service_unavailable"


async def test_pooled_connection_closed_while_idle_is_retried(world: dict[str, Any]) -> None:
    _targets(world, "brief")
    pool = world["app"][forward.FORWARD_UPSTREAM]
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, world))[0] == 200
        conn = pool._idle[world["urls"]["brief"]][0]
        deadline = asyncio.get_running_loop().time() + 5
        while conn.usable:  # the peer closes it after its 0.3 s keep-alive
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert await _post(s, world) == (200, {"served": "brief"}, "brief")
    assert len(world["seen"]["brief"]) == 2  # each request reached the peer once


async def test_stream_is_spliced_and_a_client_that_leaves_cancels_the_peer(
        world: dict[str, Any]) -> None:
    _targets(world, "good")
    async with aiohttp.ClientSession() as s:
        async with s.post(world["url"] + "/v1/completions",
                          json={**BODY, "stream": True, "x_count": 4}) as resp:
            data = await resp.read()
            assert resp.headers["Content-Type"] == "text/event-stream"
        assert data.decode().split("\n\n")[:-1] == [
            *(f'data: {{"i": {i}}}' for i in range(4)), "data: [DONE]"]
        resp = await s.post(world["url"] + "/v1/completions",
                            json={**BODY, "stream": True, "x_count": 1000, "pause": 0.05})
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # the client goes away mid-stream
    async with asyncio.timeout(5):
        while "cancelled" not in world["seen"]:
            await asyncio.sleep(0.02)
        await world["seen"]["cancelled"].wait()
    pool = world["app"][forward.FORWARD_UPSTREAM]
    assert len(pool._idle.get(world["urls"]["good"], ())) <= 1  # the cut one was not pooled


def test_the_hop_header_counts_only_where_it_may() -> None:
    for hop in (None, "", "1", "1; cap=2"):
        assert effective_hop("public", hop) is None  # a client cannot skip routing
        assert effective_hop("internal", hop) == (hop or "")  # a peer: always served here
        assert effective_hop("open", hop) == (hop or None)


def test_hop_params_read_the_hop_forms_and_nothing_else() -> None:
    assert hop_params("1") == (None, False) and hop_params("") == (None, False)
    assert hop_params("1; cap=3") == (3, False)
    assert hop_params("1; cap=123456789") == (123456789, False)
    assert hop_params("1; spill") == (None, True) and hop_params("1; cap=2; spill") == (2, True)
    for bad in ("yes", "2", "1; cap=0", "1; cap=-1", "1; cap=x", "1; cap=", "1;cap=3",
                "1; cap=3 ", "1; cap=1234567890", "1; cap=٣", "1; spill; cap=2", "spill",
                "1; spill; spill", "1; cap=2; cap=3", "1; other"):
        with pytest.raises(InvalidRequest, match="X-Meshnode-Hop"):
            hop_params(bad)


@pytest.mark.parametrize(("hop", "status", "said"), [
    ("1; cap=2", 503, "no replica here (cap 2, spill False)"),  # asked, with the cap
    ("1", 503, "no replica here (cap None, spill False)"),
    ("1; spill", 503, "no replica here (cap None, spill True)"),
    ("1; cap=zero", 400, "is not '1' [; cap=N] [; spill]"),  # the node is never asked
])
async def test_a_forwarded_request_is_served_here_with_its_cap(
        world: dict[str, Any], hop: str, status: int, said: str) -> None:
    _targets(world, "good")  # never used: a forwarded request is not forwarded again
    async with aiohttp.ClientSession() as s:
        async with s.post(world["url"] + "/v1/completions", json=BODY,
                          headers={"X-Meshnode-Hop": hop}) as resp:
            assert resp.status == status
            assert said in (await resp.json())["error"]["message"]
    assert "good" not in world["seen"]


@pytest.mark.parametrize("pooled", [True, False], ids=["without-task", "task"])
async def test_a_slow_client_pauses_the_peer_and_then_gets_every_byte(
        world: dict[str, Any], pooled: bool) -> None:
    """Backpressure through a splice: while the client reads nothing, the entry stops
    reading the peer, so the peer stalls with most of the answer unsent (rather than the
    entry buffering it all); once the client reads, every byte arrives. With an idle pooled
    connection the front splices without a task; without one, a task connects first."""
    _targets(world, "good")
    if pooled:
        async with aiohttp.ClientSession() as s:
            assert (await _post(s, world))[0] == 200
    total = 96 * 1024 * 1024  # well above what the sockets between them can hold
    host, _, port = world["url"].removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({**BODY, "x_bytes": total}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    seen, last = world["seen"], -1
    async with asyncio.timeout(30):
        while (wrote := seen.get("good wrote", 0)) != last or not wrote:
            last = wrote  # poll until the peer's progress stops
            await asyncio.sleep(0.3)
    assert last < total // 2, f"the peer sent {last} of {total} bytes to a client reading none"
    async with asyncio.timeout(60):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        received = 0
        while (size := int((await reader.readline()).strip(), 16)) > 0:
            received += len(await reader.readexactly(size + 2)) - 2
    assert received == total == seen["good wrote"]
    assert len(world["app"][forward.FORWARD_UPSTREAM]._idle[world["urls"]["good"]]) == 1
    writer.close()
