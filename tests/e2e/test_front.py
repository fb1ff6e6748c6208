"""The public port's front (meshnode/http/front.py) on a real node, through raw sockets.

Inference requests are answered by the front; everything else is handed over to the aiohttp
app with the bytes already read. These tests pin what a client sees on one connection:
keep-alive, pipelining, chunked SSE framing, hand-over in the middle of a connection, and the
requests the front must not answer itself (chunked uploads, Expect, HTTP/1.0, bare LF, bad
JSON, unknown models), which must come back exactly as aiohttp answers them.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
from conftest import NodeProcess

MODEL = "smollm2-135m-instruct"
COMPLETION = json.dumps({"model": MODEL, "prompt": "One, two, three,", "max_tokens": 2,
                         "temperature": 0.0}).encode()


class Conn:
    """One raw HTTP/1.1 connection to the node, reading answers as a strict client would."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and the body with its framing removed."""
        status_line = self._line()
        version, status, _ = status_line.decode().split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if int(status) == 100:
            return self.response()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            while self._line():  # trailer
                pass
            return int(status), headers, body
        return int(status), headers, self._take(int(headers.get("content-length", "0")))

    def closed_by_server(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def post(path: str, body: bytes, *extra: str, version: str = "HTTP/1.1") -> bytes:
    head = [f"POST {path} {version}", "Host: test", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture
def conn(node: NodeProcess):
    c = Conn(node.url)
    yield c
    c.close()


def _completion_ok(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert status == 200, body[:300]
    assert headers["x-served-by"]
    answer = json.loads(body)
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    return answer


def test_keep_alive_serves_many_requests_on_one_connection(conn: Conn) -> None:
    texts = set()
    for i in range(3):
        conn.send(post("/v1/completions", COMPLETION, f"X-Request-Id: front-{i}"))
        status, headers, body = conn.response()
        texts.add(_completion_ok(status, headers, body)["choices"][0]["text"])
        assert headers["x-request-id"] == f"front-{i}"
        assert headers["content-type"].startswith("application/json")
        assert "date" in headers and headers.get("connection", "").lower() != "close"
    assert len(texts) == 1  # greedy: the same answer every time


def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    conn.send(post("/v1/completions", COMPLETION, "X-Request-Id: first")
              + post("/v1/completions", COMPLETION, "X-Request-Id: second"))
    assert conn.response()[1]["x-request-id"] == "first"
    assert conn.response()[1]["x-request-id"] == "second"


def test_stream_is_chunked_sse_ending_in_done(conn: Conn) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5,
                       "temperature": 0.0, "stream": True}).encode()
    conn.send(post("/v1/completions", body))
    status, headers, data = conn.response()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    # The connection is still usable after a stream.
    conn.send(post("/v1/completions", COMPLETION))
    _completion_ok(*conn.response())


def test_other_routes_hand_the_connection_over_and_it_keeps_working(conn: Conn) -> None:
    conn.send(post("/v1/completions", COMPLETION))
    _completion_ok(*conn.response())
    conn.send(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")
    status, _, body = conn.response()
    assert status == 200 and MODEL in [m["id"] for m in json.loads(body)["data"]]
    conn.send(post("/v1/completions", COMPLETION))  # now served by the aiohttp app
    _completion_ok(*conn.response())


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, None),
    (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "model_not_found"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -3}).encode(), 400, None),
    (json.dumps({"model": MODEL, "input": "x"}).encode(), 400, None),  # embeddings not served
])
def test_bad_requests_get_the_apps_error_and_change_nothing(conn: Conn, body: bytes,
                                                            status: int,
                                                            code: str | None) -> None:
    path = "/v1/embeddings" if b'"input"' in body else "/v1/completions"
    conn.send(post(path, body))
    got, headers, data = conn.response()
    assert got == status, data[:300]
    error = json.loads(data)["error"]
    assert error["message"] and error["type"] == "invalid_request_error" or got == 404
    if code:
        assert error["code"] == code
    assert "x-request-id" in headers
    conn.send(post("/v1/completions", COMPLETION))  # the connection still serves
    _completion_ok(*conn.response())


def test_chunked_upload_is_served(conn: Conn) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    half = len(COMPLETION) // 2
    parts = [COMPLETION[:half], COMPLETION[half:]]
    conn.send(head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")
    _completion_ok(*conn.response())


def test_expect_continue_is_served(conn: Conn) -> None:
    conn.send(post("/v1/completions", b"", "Expect: 100-continue").replace(
        b"Content-Length: 0", f"Content-Length: {len(COMPLETION)}".encode()))
    conn.send(COMPLETION)
    _completion_ok(*conn.response())


def test_body_split_across_packets_is_served(conn: Conn) -> None:
    data = post("/v1/completions", COMPLETION)
    for i in range(0, len(data), 37):
        conn.send(data[i:i + 37])
    _completion_ok(*conn.response())


def test_connection_close_is_honoured(conn: Conn) -> None:
    conn.send(post("/v1/completions", COMPLETION, "Connection: close"))
    status, headers, body = conn.response()
    _completion_ok(status, headers, body)
    assert headers.get("connection", "").lower() == "close"
    assert conn.closed_by_server()


def test_http10_and_bare_lf_requests_get_an_answer(node: NodeProcess) -> None:
    c = Conn(node.url)
    try:
        c.send(post("/v1/completions", COMPLETION, version="HTTP/1.0"))
        data = b""
        while True:  # an HTTP/1.0 answer may end at close
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0]
    finally:
        c.close()
    c = Conn(node.url)
    try:
        c.send(post("/v1/completions", COMPLETION).replace(b"\r\n", b"\n"))
        c.sock.settimeout(30)
        first = c.sock.recv(65536)  # answered, never left waiting for a CRLF CRLF
        assert first.startswith(b"HTTP/1.") and b" 400 " in first.split(b"\r\n")[0], first[:100]
    finally:
        c.close()


def test_head_longer_than_the_fronts_limit_is_handed_over(conn: Conn) -> None:
    conn.send(post("/v1/completions", COMPLETION, "X-Big: " + "a" * 20000))
    _completion_ok(*conn.response())  # aiohttp's limits apply to it, not the front's
