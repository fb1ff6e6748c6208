"""The front's request-head reader (meshnode/http/http1.py).

`parse` answers a request only when aiohttp's strict parser would read it the same way;
anything else is None (the front hands the connection to aiohttp, which answers it). The
property test checks that against aiohttp's own parser on generated heads.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp.http_parser import HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.engines import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from meshnode.http.http1 import parse

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: node-a:7700\r\nContent-Type: application/json"
        b"\r\nContent-Length: 42")


def test_a_plain_head() -> None:
    req = parse(HEAD)
    assert req is not None
    assert req.route == (CompletionRequest, "completion", "/v1/completions")
    assert (req.length, req.close, req.hop, req.authorization, req.request_id) == \
        (42, False, None, None, "")


def test_the_fields_the_front_reads_any_case_any_spacing() -> None:
    req = parse(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-length:7\r\n"
                b"CONNECTION:  Close \r\nx-MESHNODE-hop: 1; cap=3\r\n"
                b"Authorization: Bearer sk-abc\t\r\nX-Request-Id: req-1")
    assert req is not None
    assert req.route[0] is ChatCompletionRequest
    assert (req.length, req.close, req.hop, req.authorization, req.request_id) == \
        (7, True, "1; cap=3", "Bearer sk-abc", "req-1")


@pytest.mark.parametrize("path, schema, upstream", [
    (b"/v1/embeddings", EmbeddingRequest, "/v1/embeddings"),
    (b"/v2/rerank", None, "/v1/rerank"),
    (b"/rerank", None, "/v1/rerank"),
])
def test_every_inference_route(path: bytes, schema: type | None, upstream: str) -> None:
    req = parse(HEAD.replace(b"/v1/completions", path))
    assert req is not None and req.route[2] == upstream
    assert schema is None or req.route[0] is schema


def test_an_empty_hop_header_is_no_hop() -> None:
    req = parse(HEAD + b"\r\nX-Meshnode-Hop: ")
    assert req is not None and req.hop is None


@pytest.mark.parametrize("head", [
    HEAD.replace(b"POST", b"GET"),
    HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"),
    HEAD.replace(b"/v1/completions", b"/v1/completions?x=1"),
    HEAD.replace(b"/v1/completions", b"/v1/models"),
    HEAD.replace(b"Content-Length: 42", b"Content-Length: 4x"),
    HEAD.replace(b"Content-Length: 42", b"Content-Length: -4"),
    HEAD.replace(b"Content-Length: 42", b"X-Other: 1"),          # no length
    HEAD + b"\r\ncontent-length: 42",                            # twice
    HEAD.replace(b"Host: node-a:7700", b"Accept: */*"),          # no Host (aiohttp: 400)
    HEAD + b"\r\nAuthorization: a\r\nAuthorization: b",          # a read field twice
    HEAD + b"\r\nTransfer-Encoding: chunked",
    HEAD + b"\r\nExpect: 100-continue",
    HEAD + b"\r\nUpgrade: websocket",
    HEAD.replace(b"\r\nHost", b"\nHost"),                        # bare LF
    HEAD.replace(b"Host: node-a", b"Host: no\rde-a"),            # bare CR
    HEAD + b"\r\n folded",                                       # obsolete line folding
    HEAD.replace(b"Host:", b"Host :"),                           # space before the colon
    HEAD.replace(b"Host:", b"Ho(st:"),                           # not a token
    HEAD + b"\r\nno colon",
], ids=["GET", "HTTP/1.0", "query", "other route", "bad length", "negative length",
        "no length", "length twice", "no host", "authorization twice", "chunked", "expect", "upgrade",
        "bare LF", "bare CR", "folded", "space before colon", "not a token", "no colon"])
def test_anything_else_is_handed_over(head: bytes) -> None:
    assert parse(head) is None


_NAMES = st.sampled_from([b"Host", b"Content-Length", b"content-length", b"Connection",
                          b"Authorization", b"X-Request-Id", b"X-Meshnode-Hop", b"Expect",
                          b"Transfer-Encoding", b"Accept", b"Ho st", b" Host", b"X(1)", b""])
_VALUES = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"")) | st.sampled_from(
    [b"12", b" 12 ", b"0", b"close", b"keep-alive", b"chunked", b"1; cap=2", b"a\nb"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_NAMES, st.sampled_from([b":", b": ", b" :"]), _VALUES),
                max_size=6))
def test_whatever_it_reads_aiohttp_reads_alike(fields: list[tuple[bytes, bytes, bytes]]) -> None:
    head = b"POST /v1/completions HTTP/1.1" + b"".join(
        b"\r\n" + name + colon + value for name, colon, value in fields)
    req = parse(head)
    if req is None:
        return  # aiohttp decides
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(mock.Mock(), loop, 2**16, max_line_size=8190,
                                   max_field_size=8190)
        messages, _, _ = parser.feed_data(head + b"\r\n\r\n" + b"x" * req.length)
    finally:
        loop.close()
    message = messages[0][0]
    assert message.method == "POST" and message.path == "/v1/completions"
    assert int(message.headers["Content-Length"]) == req.length
    assert message.should_close == req.close
    assert message.headers.get("Authorization") == req.authorization
    assert (message.headers.get("X-Meshnode-Hop") or None) == req.hop
    assert message.headers.get("X-Request-Id", "") == req.request_id
