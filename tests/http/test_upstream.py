"""The lean upstream client against real aiohttp servers (and a raw one that misbehaves)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from meshnode.http.splice import splice
from meshnode.http.upstream import (BUFFER_HIGH, KEEPALIVE, SILENT_S, UNACKED_S, Unreachable,
                                    Upstream, UpstreamError)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    seen: dict[str, object] = {"cancelled": asyncio.Event(), "bodies": []}

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen["bodies"].append(body)  # type: ignore[attr-defined]
        return web.json_response({"len": len(body), "ct": request.content_type,
                                  "rid": request.headers.get("X-Request-Id")})

    async def stream(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        size = int(request.query.get("size", "10"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                await resp.write(f"data: {i}\n\n".encode() + b"x" * size)
            await resp.write_eof()
        except asyncio.CancelledError:
            seen["cancelled"].set()  # type: ignore[attr-defined]
            raise
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            await resp.write(b"first")
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"].set()  # type: ignore[attr-defined]
            raise
        return resp

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=0.3)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    sock = str(tmp_path / "s.sock")
    await web.UnixSite(runner, sock).start()
    port = runner.addresses[0][1]
    seen["tcp"] = f"http://127.0.0.1:{port}"
    seen["unix"] = f"unix:{sock}"
    yield seen
    await runner.cleanup()


async def test_content_length_answer_and_reuse(server: dict[str, object]) -> None:
    async with Upstream() as up:
        for base in (server["tcp"], server["unix"]):
            for i in range(3):
                body = b'{"a": 1}' * (i + 1)
                async with await up.request("POST", str(base), "/echo", body, {
                        "Content-Type": "application/json", "X-Request-Id": "r1"}) as r:
                    assert r.status == 200
                    assert r.content_type == "application/json"
                    assert await r.json() == {"len": len(body), "ct": "application/json",
                                                   "rid": "r1"}
            assert len(up._idle[str(base)]) == 1  # one connection, reused


async def test_chunked_stream_in_order(server: dict[str, object]) -> None:
    async with Upstream() as up:
        async with await up.request("GET", str(server["tcp"]), "/stream?n=50&size=3") as r:
            assert r.headers["transfer-encoding"].lower() == "chunked"
            data = b"".join([c async for c in r.iter_chunks()])
        assert data == b"".join(f"data: {i}\n\n".encode() + b"xxx" for i in range(50))
        # read to its end: back in the pool, and the next request on it works
        assert len(up._idle[str(server["tcp"])]) == 1
        async with await up.request("POST", str(server["tcp"]), "/echo", b"x") as r:
            assert (await r.json())["len"] == 1


async def test_large_body_with_backpressure(server: dict[str, object]) -> None:
    size = 8 * BUFFER_HIGH
    url = str(server["tcp"])
    async with Upstream() as up, await up.request("GET", url, f"/stream?n=1&size={size}") as r:
        got = 0
        async for chunk in r.iter_chunks():
            got += len(chunk)
            await asyncio.sleep(0)  # a slow reader
        assert got == size + len(b"data: 0\n\n")


async def test_stale_pooled_connection_is_retried_once(server: dict[str, object]) -> None:
    async with Upstream() as up:
        async with await up.request("POST", str(server["tcp"]), "/echo", b"1") as r:
            await r.read()
        conn = up._idle[str(server["tcp"])][0]
        deadline = asyncio.get_running_loop().time() + 5
        while conn.usable:  # the server closes it after its 0.3 s keep-alive
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        async with await up.request("POST", str(server["tcp"]), "/echo", b"22") as r:
            assert (await r.json())["len"] == 2
    assert server["bodies"] == [b"1", b"22"]  # sent once each


async def test_unreachable_and_refused() -> None:
    async with Upstream(connect_timeout_s=2) as up:
        with pytest.raises(UpstreamError, match="cannot connect"):
            await up.request("POST", "http://127.0.0.1:1", "/x")
        with pytest.raises(UpstreamError, match="cannot connect"):
            await up.request("POST", "unix:/nonexistent/socket", "/x")
        with pytest.raises(UpstreamError, match="ssl context"):
            await up.request("POST", "https://127.0.0.1:1", "/x")


async def test_cancel_mid_stream_closes_the_connection(server: dict[str, object]) -> None:
    async with Upstream() as up:
        r = await up.request("GET", str(server["tcp"]), "/slow")
        async for chunk in r.iter_chunks():
            assert chunk == b"first"
            break
        r.release()  # body not read to its end: closed, not pooled
        assert not up._idle.get(str(server["tcp"]))
        async with asyncio.timeout(5):
            await server["cancelled"].wait()  # type: ignore[attr-defined]


@pytest.mark.parametrize("answer, match", [
    (b"garbage\r\n\r\n", "not an HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000, "head over"),
    (b"", "without answering"),
])
async def test_misbehaving_server(answer: bytes, match: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with Upstream() as up:
            with pytest.raises(UpstreamError, match=match):
                async with await up.request("POST", f"http://127.0.0.1:{port}", "/x") as r:
                    await r.read()
            assert not up._idle.get(f"http://127.0.0.1:{port}")
    finally:
        srv.close()
        await srv.wait_closed()


async def test_read_until_close_framing() -> None:
    payload = os.urandom(5000)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
                     + payload)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with Upstream() as up:
            async with await up.request("GET", f"http://127.0.0.1:{port}", "/") as r:
                assert await r.read() == payload
            assert not up._idle.get(f"http://127.0.0.1:{port}")  # not reusable
    finally:
        srv.close()
        await srv.wait_closed()


async def test_https_with_the_given_context(tmp_path: Path) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="over tls")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    base = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with Upstream(ssl_context=client_ctx) as up, \
                await up.request("GET", base, "/") as r:
            assert r.ssl_object is not None
            assert r.ssl_object.getpeercert(binary_form=True) == cert.public_bytes(
                serialization.Encoding.DER)
            assert await r.read() == b"over tls"
        async with Upstream(ssl_context=ssl.create_default_context()) as up:  # untrusted
            with pytest.raises(UpstreamError, match="cannot connect"):
                await up.request("GET", base, "/")
    finally:
        await runner.cleanup()


class _Out:
    """Where a splice writes: the bytes a client would receive."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _decode_answer(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Head lines and the body (framing removed) of one HTTP/1.1 answer, strictly."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])}
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                assert rest == b"\r\n", rest  # nothing after the end
                return lines[0], headers, body
            body += rest[:size]
            assert rest[size:size + 2] == b"\r\n"
            rest = rest[size + 2:]
    assert len(rest) == int(headers[b"content-length"])
    return lines[0], headers, rest


async def test_splice_passes_answers_through_and_pools(server: dict[str, object]) -> None:
    async with Upstream() as up:
        for base in (str(server["tcp"]), str(server["unix"])):
            for i in range(3):
                out = _Out()
                body = b'{"a": 1}' * (i + 1)
                done = await splice(up, "POST", base, "/echo", body, {"X-Request-Id": "r9"},
                                       out, extra_head=b"Connection: close\r\n")  # type: ignore[arg-type]
                assert (done.outcome, done.status, done.keep_alive) == ("done", 200, True)
                status, headers, got = _decode_answer(out.data)
                assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
                assert msgspec.json.decode(got) == {"len": len(body), "ct": "application/octet-stream", "rid": "r9"}
            assert len(up._idle[base]) == 1  # one connection, reused
        out = _Out()
        done = await splice(up, "GET", str(server["tcp"]), "/stream?n=40&size=3", b"", None,
                               out)  # type: ignore[arg-type]
        assert done.outcome == "done"
        _, headers, got = _decode_answer(out.data)
        assert headers[b"transfer-encoding"] == b"chunked"
        assert got == b"".join(f"data: {i}\n\n".encode() + b"xxx" for i in range(40))
        assert len(up._idle[str(server["tcp"])]) == 1


async def _raw_server(answer: bytes, *, byte_by_byte: bool = False):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for part in ([answer[i:i + 1] for i in range(len(answer))] if byte_by_byte
                     else [answer]):
            writer.write(part)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("answer, retry_503, outcome, at_boundary, written", [
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno", True, "retry", False,
     b""),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno", False, "done", False,
     None),
    (CHUNKED_HEAD + b"5\r\nhello\r\n", False, "broken", True, None),
    (CHUNKED_HEAD + b"5\r\nhel", False, "broken", False, None),
    (CHUNKED_HEAD + b"zz\r\n", False, "broken", False, CHUNKED_HEAD),  # garbage not passed
    (b"garbage\r\n\r\n", False, "failed", False, b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", False, "broken", False, None),
    (b"", False, "failed", False, b""),
    (CHUNKED_HEAD + b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", False, "done", False, None),
])
@pytest.mark.parametrize("byte_by_byte", [False, True])
async def test_splice_outcomes(answer: bytes, retry_503: bool, outcome: str,
                               at_boundary: bool, written: bytes | None,
                               byte_by_byte: bool) -> None:
    srv = await _raw_server(answer, byte_by_byte=byte_by_byte)
    base = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    try:
        async with Upstream() as up:
            out = _Out()
            done = await splice(up, "POST", base, "/x", b"{}", None, out,  # type: ignore[arg-type]
                                   retry_503=retry_503)
            assert (done.outcome, done.at_boundary) == (outcome, at_boundary)
            assert out.data == (answer if written is None else written)
            if outcome != "done":  # a whole answer may be pooled (the close comes after)
                assert not up._idle.get(base)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_splice_check_refuses_before_sending(server: dict[str, object]) -> None:
    async with Upstream() as up:
        out = _Out()
        done = await splice(up, "POST", str(server["tcp"]), "/echo", b"1", None, out,  # type: ignore[arg-type]
                               check=lambda ssl_object: False)
        assert done.outcome == "refused" and out.data == b""
    assert server["bodies"] == []  # nothing was sent


async def test_splice_retries_a_stale_pooled_connection(server: dict[str, object]) -> None:
    base = str(server["tcp"])
    async with Upstream() as up:
        assert (await splice(up, "POST", base, "/echo", b"1", None, _Out())).outcome == "done"  # type: ignore[arg-type]
        conn = up._idle[base][0]
        deadline = asyncio.get_running_loop().time() + 5
        while conn.usable:  # the server closes it after its 0.3 s keep-alive
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        out = _Out()
        assert (await splice(up, "POST", base, "/echo", b"22", None, out)).outcome == "done"  # type: ignore[arg-type]
    assert server["bodies"] == [b"1", b"22"]  # sent once each


async def test_splice_cancelled_closes_the_connection(server: dict[str, object]) -> None:
    async with Upstream() as up:
        out = _Out()
        task = asyncio.ensure_future(splice(up, "GET", str(server["tcp"]), "/slow", b"", None,
                                               out))  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while b"first" not in out.data:
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not up._idle.get(str(server["tcp"]))
        async with asyncio.timeout(5):
            await server["cancelled"].wait()  # type: ignore[attr-defined]


@pytest.fixture
async def frozen() -> AsyncIterator[str]:
    """A server that answers the first request on each connection, then reads and never
    answers again: a peer that froze (its kernel still accepts connections and takes bytes).
    Its address; on teardown every connection it accepted is closed and its handler done."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with _serving(handle) as base:
        yield base


@contextlib.asynccontextmanager
async def _serving(answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                    Awaitable[None]]) -> AsyncIterator[str]:
    """A loopback server whose connections `answer` the request(s) they want, then read and
    never answer again; its address. On exit every connection is closed and its handler
    done."""
    tasks: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await answer(reader, writer)
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await srv.wait_closed()


async def _waiting_on_a_pooled_connection(up: Upstream, base: str, path: str
                                          ) -> tuple[asyncio.Future[Any], Any]:
    """A second request to the frozen server `base` (by `path`: request or splice) on the
    connection the first left in the pool, still waiting for its answer; (it, the conn)."""
    async with await up.request("GET", base, "/") as r:
        assert await r.read() == b"ok"
    assert len(up._idle[base]) == 1  # the next request reuses it
    conn = up._idle[base][0]
    if path == "request":
        pending = asyncio.ensure_future(up.request("GET", base, "/"))
    else:
        pending = asyncio.ensure_future(splice(up, "POST", base, "/x", b"{}", None,
                                               _Out()))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert not pending.done()
    return pending, conn


@pytest.mark.parametrize("path", ["request", "splice"])
async def test_drop_fails_requests_waiting_on_a_dead_peer(path: str, frozen: str) -> None:
    """Without drop they wait for ever; with it, one on a pooled connection fails as
    unreachable (not stale: sending it again to the same peer would wait again)."""
    base = frozen
    async with Upstream() as up:
        pending, _ = await _waiting_on_a_pooled_connection(up, base, path)
        assert up.drop(base) == 1
        async with asyncio.timeout(2):
            if path == "request":
                with pytest.raises(UpstreamError, match="declared dead"):
                    await pending
            else:
                assert (await pending).outcome == "failed"
        assert not up._idle.get(base) and up.drop(base) == 0


@pytest.fixture
async def half_frozen() -> AsyncIterator[str]:
    """A server that streams five chunks, 0.1 s apart, to GET /stream, one chunk and then
    nothing to GET /stall, and reads and never answers any other request: a peer whose path
    back to us broke while some answers flowed."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        stream, stall = head.startswith(b"GET /stream "), head.startswith(b"GET /stall ")
        if stream or stall:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(5 if stream else 1):
                await asyncio.sleep(0.1)
                writer.write(b"1\r\nx\r\n")
            if stream:
                writer.write(b"0\r\n\r\n")

    async with _serving(handle) as base:
        yield base


@pytest.mark.parametrize("path", ["request", "splice"])
async def test_drop_unanswered_moves_waiting_requests_and_leaves_answers_alone(
        path: str, half_frozen: str) -> None:
    """A peer likely not to answer (node/reach.py, node/peers.py): a request with no byte of
    answer yet and another replica to try fails at once, to be tried there; an answer that
    gets nothing more for SILENT_S is cut off; one still arriving streams to its end; a
    request with nowhere else to go keeps waiting."""
    base = half_frozen
    async with Upstream() as up:
        stalled = await up.request("GET", base, "/stall")
        chunks = stalled.iter_chunks()
        assert await anext(chunks) == b"x"
        async with await up.request("GET", base, "/stream") as r:
            assert await r.read() == b"xxxxx"
        assert len(up._idle[base]) == 1  # the waiting request reuses it: answered before
        if path == "request":
            waiting = asyncio.ensure_future(up.request("GET", base, "/wait"))
        else:
            out: Any = _Out()
            waiting = asyncio.ensure_future(splice(up, "POST", base, "/wait", b"{}", None, out,
                                                   retry_503=True))
        await asyncio.sleep(0.1)
        answering = await up.request("GET", base, "/stream")
        last = asyncio.ensure_future(up.request("GET", base, "/wait", movable=False))
        await asyncio.sleep(0.1)
        assert not waiting.done() and not last.done()
        dropped = asyncio.get_running_loop().time()
        assert up.drop_unanswered(base, "unreachable from this node") == 1
        async with asyncio.timeout(SILENT_S + 1):
            if path == "request":
                with pytest.raises(UpstreamError, match="unreachable from this node"):
                    await waiting
            else:
                assert (await waiting).outcome == "failed"  # not stale: not the same peer
            assert b"".join([c async for c in answering.iter_chunks()]) == b"xxxxx"
            with pytest.raises(UpstreamError):
                await anext(chunks)
        assert asyncio.get_running_loop().time() - dropped >= SILENT_S * 0.9
        answering.release()
        assert not last.done()  # nowhere else to go: it waits (until the peer is dead)
        assert up.drop_unanswered(base, "again") == 0  # the idle one is closed, not counted
        assert not up._idle.get(base)
        assert up.drop(base) == 1
        with pytest.raises(UpstreamError, match="declared dead"):
            await last


async def test_peer_connections_probe_a_silent_peer_with_tcp_keepalive(frozen: str) -> None:
    """A peer cut off the network (not declared dead, e.g. a one-way partition) breaks its
    connections after KEEPALIVE's probes instead of leaving an answer waited for for ever."""
    base = frozen
    async with Upstream() as up:
        async with await up.request("GET", base, "/") as r:
            assert await r.read() == b"ok"
        sock = up._idle[base][0].transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == KEEPALIVE
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP,
                                   socket.TCP_USER_TIMEOUT) == int(UNACKED_S * 1000)


@pytest.mark.parametrize("path", ["request", "splice"])
async def test_a_request_on_a_connection_that_timed_out_is_unreachable(
        path: str, frozen: str) -> None:
    """The kernel breaks a connection whose request stays unacknowledged (UNACKED_S): that is
    a broken path, not a connection the peer closed while idle, so the same peer is not tried
    again on a fresh connection (it would wait again); the caller marks it unreachable."""
    base = frozen
    async with Upstream() as up:
        pending, conn = await _waiting_on_a_pooled_connection(up, base, path)
        transport = conn.transport
        assert transport is not None
        conn.connection_lost(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))  # kernel
        transport.abort()
        async with asyncio.timeout(2):
            if path == "request":
                with pytest.raises(Unreachable, match="timed out"):
                    await pending
            else:
                assert (await pending).outcome == "unreachable"
