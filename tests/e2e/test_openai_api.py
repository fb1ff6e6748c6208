"""End to end: a real node process serving real weights, driven by the official openai client,
every response and stream chunk validated against OpenAI's published schemas."""

from __future__ import annotations

import json
import urllib.request

import aiohttp
import openai
import pytest
from conftest import NodeProcess, OpenAISpec, completion_chunk_as_spec, get_json, post_json

CHAT = "smollm2-135m-instruct"
BASE = "gemma-3-270m"
pytestmark = pytest.mark.e2e


def test_chat_completion(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "Say hello to me."}],
        max_tokens=24, temperature=0.2, seed=1)
    assert raw.headers["x-request-id"]
    assert raw.headers["x-served-by"]
    body = json.loads(raw.content)
    openai_spec.validate("CreateChatCompletionResponse", body)
    reply = raw.parse()
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    assert text and any(c.isalpha() for c in text)
    assert reply.model == CHAT
    assert reply.id.endswith(raw.headers["x-request-id"])
    assert reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_usage_counts_the_reused_prompt_prefix(client: openai.OpenAI,
                                               openai_spec: OpenAISpec) -> None:
    system = "You answer questions about a small bakery in Lyon, briefly. " * 8

    def cached(sys_prompt: str, question: str) -> tuple[int, int]:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, max_tokens=2, messages=[{"role": "system", "content": sys_prompt},
                                                {"role": "user", "content": question}])
        openai_spec.validate("CreateChatCompletionResponse", json.loads(raw.content))
        reply = raw.parse()
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        return reply.usage.prompt_tokens_details.cached_tokens or 0, reply.usage.prompt_tokens

    cached(system, "Open on Sunday?")
    hit, total = cached(system, "Do you sell croissants?")  # same system prompt: reused
    assert hit >= total * 0.8, (hit, total)
    miss, _ = cached("Talk like a pirate. " * 8, "Do you sell croissants?")
    assert miss < 10  # only the chat template's first tokens are shared


def test_openai_hints_are_accepted(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    """OpenAI's fields that leave the answer unchanged pass the node and the llama.cpp
    engine's strict check (a field neither knows is refused: see ERROR_CASES)."""
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        metadata={"app": "tests"}, store=False, service_tier="auto",
        safety_identifier="user-1", prompt_cache_key="user-1", parallel_tool_calls=False,
        prompt_cache_retention="in_memory",
        prediction={"type": "content", "content": "Hi."})
    openai_spec.validate("CreateChatCompletionResponse", json.loads(raw.content))
    assert raw.parse().usage.completion_tokens > 0


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.name %}{{ m.name }}, {% endif %}"
            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_base_model_chats_with_a_template_given_at_launch(node: NodeProcess,
                                                            openai_spec: OpenAISpec) -> None:
    """Gemma 3 base has no chat template; launched with one, it chats through it (the prompt
    is the template's rendering, BOS from `bos_token` included and a message's `name` when
    given: as many tokens as that text sent as a completion, where the engine adds the
    BOS). A
    template that is not Jinja is a 400 that launches nothing."""
    before = get_json(node.url + "/v1/deployments")["data"]
    status, body = post_json(node.url + "/v1/deployments",
                             {"model": BASE, "name": "bad-template",
                              "chat_template": "{% for m in messages %}{{ m.content }}"})
    assert status == 400 and body["error"]["param"] == "chat_template", body
    assert "not valid Jinja" in body["error"]["message"] and "endfor" in body["error"]["message"]
    assert get_json(node.url + "/v1/deployments")["data"] == before
    status, body = post_json(node.url + "/v1/deployments",
                             {"model": BASE, "name": "gemma-chat", "chat_template": TEMPLATE})
    assert status == 201, body
    try:
        node.wait_ready("gemma-chat")
        for name, rendered in ((None, "user: Name a fruit.\nassistant:"),
                               ("Ada", "Ada, user: Name a fruit.\nassistant:")):
            message = {"role": "user", "content": "Name a fruit."}
            if name:
                message["name"] = name  # a participant's name reaches the template
            status, reply = post_json(node.url + "/v1/chat/completions",
                                      {"model": "gemma-chat", "messages": [message],
                                       "max_tokens": 4})
            assert status == 200, reply
            openai_spec.validate("CreateChatCompletionResponse", reply)
            status, plain = post_json(node.url + "/v1/completions",
                                      {"model": "gemma-chat", "max_tokens": 1,
                                       "prompt": rendered})
            assert status == 200, plain
            assert reply["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"], name
    finally:
        request = urllib.request.Request(node.url + "/v1/deployments/gemma-chat",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=30).read()


def test_a_launch_sets_the_context_window_and_refuses_more_than_the_model_has(
        node: NodeProcess) -> None:
    """`context_length` reaches the engine (a 512-token Gemma refuses a prompt the 8192-token
    one serves); more than the model's window (read from the GGUF header for a file given by
    path) or the node's max_context_length, or engine arguments for an engine that takes
    none, is a 400 naming the field that launches nothing."""
    gguf = node.data_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert gguf.is_file(), sorted((node.data_dir / "models").iterdir())
    before = get_json(node.url + "/v1/deployments")["data"]
    for body, param, says in (
            ({"model": BASE, "context_length": 40000}, "context_length",
             "more than gemma-3-270m's context window of 32768 tokens"),
            ({"model": str(gguf), "context_length": 40000}, "context_length",
             "context window of 32768 tokens"),  # the file's header, not a guess
            ({"model": BASE, "context_length": 16384}, "context_length",
             "more than this node's max_context_length of 8192"),
            ({"model": BASE, "engine_args": ["--max-num-seqs", "2"]}, "engine_args",
             "the llama.cpp engine runs inside meshnode and takes none")):
        status, answer = post_json(node.url + "/v1/deployments", {**body, "name": "refused"})
        assert status == 400 and answer["error"]["param"] == param, answer
        assert says in answer["error"]["message"], answer
    assert get_json(node.url + "/v1/deployments")["data"] == before

    status, view = post_json(node.url + "/v1/deployments",
                             {"model": BASE, "name": "gemma-512", "context_length": 512})
    assert status == 201 and view["context_length"] == 512, view
    try:
        node.wait_ready("gemma-512")
        prompt = "one two three four five six seven eight nine ten " * 60  # ~600 tokens
        status, answer = post_json(node.url + "/v1/completions",
                                   {"model": "gemma-512", "prompt": prompt, "max_tokens": 1})
        assert status == 400, answer
        assert answer["error"]["code"] == "context_length_exceeded", answer
        assert "512" in answer["error"]["message"], answer
        status, answer = post_json(node.url + "/v1/completions",
                                   {"model": BASE, "prompt": prompt, "max_tokens": 1})
        assert status == 200 and answer["usage"]["prompt_tokens"] > 512, answer
    finally:
        request = urllib.request.Request(node.url + "/v1/deployments/gemma-512",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=30).read()


def test_chat_content_parts(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT, max_completion_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say"},
                                                {"type": "text", "text": " hi."}]}])
    assert reply.usage.completion_tokens <= 8
    assert reply.choices[0].message.content


def test_chat_stream_chunks(client: openai.OpenAI, node: NodeProcess,
                            openai_spec: OpenAISpec) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=CHAT, messages=[{"role": "user", "content": "Count from one to five."}],
            max_tokens=16, stream=True, stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        openai_spec.validate("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(isinstance(c["created"], int) for c in chunks)
    body, usage_chunk = chunks[:-1], chunks[-1]
    assert body[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in body[1:])
    reasons = [c["choices"][0]["finish_reason"] for c in body]
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body)
    assert text.strip()
    # the official client's own stream parser accepts it too
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True)
    assert sum(1 for _ in stream) >= 2


def test_stream_without_usage_has_no_usage_field(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            stream=True) as resp:
        chunks = [json.loads(x[6:]) for x in resp.iter_lines() if x and x != "data: [DONE]"]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_completions(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    raw = client.completions.with_raw_response.create(
        model=BASE, prompt="The capital of France is", max_tokens=12, temperature=0)
    body = json.loads(raw.content)
    openai_spec.validate("CreateCompletionResponse", body)
    reply = raw.parse()
    assert reply.object == "text_completion"
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens == 12 or reply.choices[0].finish_reason == "stop"


def test_completions_stream(client: openai.OpenAI, openai_spec: OpenAISpec) -> None:
    with client.completions.with_streaming_response.create(
            model=BASE, prompt="Once upon a time", max_tokens=10, stream=True,
            stream_options={"include_usage": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for chunk in chunks[:-1]:
        openai_spec.validate("CreateCompletionResponse", completion_chunk_as_spec(chunk))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_completions_token_ids_and_batch(client: openai.OpenAI) -> None:
    text = client.completions.create(model=BASE, prompt="Hello", max_tokens=3, temperature=0)
    ids = client.completions.create(model=BASE, prompt=[2, 9259], max_tokens=3, temperature=0)
    assert ids.choices[0].text
    batch = client.completions.create(model=BASE, prompt=["One", "Two"], max_tokens=3)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.completion_tokens == 6
    assert text.usage.prompt_tokens == ids.usage.prompt_tokens == 2


def test_stop_sequences(client: openai.OpenAI) -> None:
    free = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    assert "6" in free, free
    reply = client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=12,
                                      temperature=0, stop=["6"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == free[:free.index("6")]
    with client.completions.with_streaming_response.create(
            model=BASE, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6,"],
            stream=True) as resp:
        parts = [json.loads(x[6:]) for x in resp.iter_lines() if x and x != "data: [DONE]"]
    streamed = "".join(p["choices"][0]["text"] for p in parts)
    assert streamed == free[:free.index(" 6,")]
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        return client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=20, temperature=1.0, seed=seed).choices[0].message.content or ""

    first, again, other = ask(7), ask(7), ask(8)
    assert first == again
    assert first != other


def test_models(client: openai.OpenAI, node: NodeProcess, openai_spec: OpenAISpec) -> None:
    import urllib.request
    with urllib.request.urlopen(node.url + "/v1/models") as resp:
        body = json.loads(resp.read())
    openai_spec.validate("ListModelsResponse", body)
    ids = {m.id for m in client.models.list()}
    assert {CHAT, BASE} <= ids
    model = client.models.retrieve(CHAT)
    assert model.id == CHAT and model.object == "model"
    with urllib.request.urlopen(node.url + f"/v1/models/{CHAT}") as resp:
        openai_spec.validate("Model", json.loads(resp.read()))
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# errors ------------------------------------------------------------------------------------

ERROR_CASES = [
    # (path, body, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b'{"model": "%s"}' % CHAT.encode(), 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "model"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": 9}'
     % CHAT.encode(), 400, "temperature"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}'
     % CHAT.encode(), 400, "max_tokens"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "wizard", "content": "x"}]}' % CHAT.encode(),
     400, "messages[0].role"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "n": 2}'
     % CHAT.encode(), 400, "n"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}'
     % CHAT.encode(), 400, "messages"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}]}' % BASE.encode(),
     400, "model"),
    ("/v1/chat/completions",
     b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    ("/v1/completions", b'{"model": "%s", "prompt": [[]]}' % BASE.encode(), 400, "prompt"),
    ("/v1/completions", b'{"model": "%s", "prompt": 3}' % BASE.encode(), 400, "prompt"),
    ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "model"),
    # A field the llama.cpp engine does not know is refused by name, not dropped.
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], '
     b'"repetition_penalty": 1.3}' % CHAT.encode(), 400, "repetition_penalty"),
    ("/v1/completions", b'{"model": "%s", "prompt": "x", "mirostat": 2}' % BASE.encode(),
     400, "mirostat"),
    ("/v1/nothing-here", b"{}", 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERROR_CASES)
async def test_error_bodies(node: NodeProcess, openai_spec: OpenAISpec, path: str, body: bytes,
                            status: int, param: str | None) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + path, data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status, await resp.text()
            payload = await resp.json()
            assert resp.headers["X-Request-Id"]
    openai_spec.validate("ErrorResponse", payload)
    assert payload["error"]["param"] == param
    assert payload["error"]["message"]


async def test_oversized_body_is_413(node: NodeProcess, openai_spec: OpenAISpec) -> None:
    import io
    big = io.BytesIO(b'{"model": "x", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}')
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/completions", data=big) as resp:
            assert resp.status == 413
            openai_spec.validate("ErrorResponse", await resp.json())


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=9000)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user",
                                                                   "content": "x"}])


def test_request_id_is_echoed(node: NodeProcess) -> None:
    import urllib.request
    req = urllib.request.Request(node.url + "/health", headers={"X-Request-Id": "abc-123"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["X-Request-Id"] == "abc-123"
        assert json.loads(resp.read())["status"] == "ok"
