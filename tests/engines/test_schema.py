import pytest

from meshnode.engines import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    decode_request,
)
from meshnode.engines.schema import strict


def chat(extra: str = "", messages: str = '[{"role": "user", "content": "hi"}]') -> bytes:
    return ('{"model": "m", "messages": ' + messages + extra + "}").encode()


def test_decodes_a_full_chat_request() -> None:
    req = decode_request(chat(', "max_completion_tokens": 5, "stop": "x", "seed": 3, '
                              '"temperature": 0.5, "top_p": 0.9, "stream": true, '
                              '"stream_options": {"include_usage": true}, "unknown": 1'),
                         ChatCompletionRequest)
    params = req.sampling()
    assert (params.max_tokens, params.stop, params.seed) == (5, ("x",), 3)
    assert req.include_usage


def test_content_parts_join_into_text() -> None:
    req = decode_request(chat(messages='[{"role": "user", "content": [{"type": "text", '
                                       '"text": "a"}, {"type": "text", "text": "b"}]}]'),
                         ChatCompletionRequest)
    assert req.messages[0].text() == "ab"


@pytest.mark.parametrize(("body", "param"), [
    (b"{", None),
    (b"[]", None),
    (chat(', "temperature": -1'), "temperature"),
    (chat(', "top_p": 0'), "top_p"),
    (chat(', "max_tokens": 0'), "max_tokens"),
    (chat(', "n": 3'), "n"),
    (chat(', "stop": ["a", "b", "c", "d", "e"]'), "stop"),
    (chat(', "stop": [""]'), "stop"),
    (chat(', "tools": [{"type": "function"}]'), "tools"),
    (chat(', "logprobs": true'), "logprobs"),
    (chat(', "response_format": {"type": "xml"}'), "response_format.type"),
    (chat(', "response_format": {"type": "json_schema"}'), "response_format"),
    (chat(', "response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}'),
     "response_format.json_schema.name"),
    (chat(', "response_format": {"type": "json_schema", '
          '"json_schema": {"name": "x", "schema": 5}}'), "response_format.json_schema.schema"),
    (chat(', "stream_options": {"include_usage": true}'), "stream_options"),
    (chat(', "max_tokens": 3, "max_completion_tokens": 4'), "max_completion_tokens"),
    (chat(messages="[]"), "messages"),
    (chat(messages='[{"role": "user"}]'), "messages[0].content"),
    (chat(messages='[{"role": "tool", "content": "x"}]'), "messages[0].role"),
    (chat(messages='[{"role": "user", "content": [{"type": "image_url", '
                   '"image_url": {"url": "x"}}]}]'), "messages[0].content[0]"),
    (chat(messages='[{"role": "user", "content": [{"type": "audio"}]}]'),
     "messages[0].content[0].type"),
])
def test_bad_chat_requests_name_the_param(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, ChatCompletionRequest)
    assert info.value.param == param
    assert str(info.value)


@pytest.mark.parametrize(("prompt", "expected"), [
    ('"x"', ["x"]),
    ('["a", "b"]', ["a", "b"]),
    ("[1, 2]", [[1, 2]]),
    ("[[1], [2, 3]]", [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt: str, expected: list) -> None:
    req = decode_request(b'{"model": "m", "prompt": %s}' % prompt.encode(), CompletionRequest)
    assert req.prompts() == expected


@pytest.mark.parametrize("prompt", ["[]", "[[]]", "[1, \"a\"]", "[true]", "{}", "3"])
def test_bad_completion_prompts(prompt: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(b'{"model": "m", "prompt": %s}' % prompt.encode(), CompletionRequest)
    assert info.value.param == "prompt"


def test_stream_with_several_prompts_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        decode_request(b'{"model": "m", "prompt": ["a", "b"], "stream": true}', CompletionRequest)


def test_response_format_reaches_the_sampling_params() -> None:
    from meshnode.engines.schema import JsonObjectFormat, JsonSchemaFormat, format_type
    body = chat(', "response_format": {"type": "json_schema", "json_schema": '
                '{"name": "city", "schema": {"type": "object"}, "strict": true}}')
    params = decode_request(body, ChatCompletionRequest).sampling()
    assert isinstance(params.response_format, JsonSchemaFormat)
    assert params.response_format.json_schema.schema == {"type": "object"}
    assert format_type(params.response_format) == "json_schema"
    text = decode_request(chat(', "response_format": {"type": "text"}'), ChatCompletionRequest)
    assert text.sampling().response_format is None
    assert format_type(text.sampling().response_format) == "text"
    completion = decode_request(b'{"model": "m", "prompt": "x", '
                                b'"response_format": {"type": "json_object"}}', CompletionRequest)
    assert isinstance(completion.sampling().response_format, JsonObjectFormat)


def test_strict_refuses_an_unknown_field_by_name_and_takes_openai_hints() -> None:
    unknown = chat(', "repetition_penalty": 1.3')
    assert decode_request(unknown, ChatCompletionRequest).model == "m"  # the node passes it
    with pytest.raises(InvalidRequest) as info:
        decode_request(unknown, strict(ChatCompletionRequest))  # an in-host engine does not
    assert info.value.param == "repetition_penalty"
    hints = chat(', "metadata": {"app": "x"}, "store": false, "service_tier": "auto", '
                 '"safety_identifier": "u", "prompt_cache_key": "k", '
                 '"prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "1h"}, '
                 '"parallel_tool_calls": true, "prediction": {"type": "content", "content": "x"}')
    req = decode_request(hints, strict(ChatCompletionRequest))
    assert isinstance(req, ChatCompletionRequest) and req.prompt_cache_key == "k"
    with pytest.raises(InvalidRequest) as info:
        decode_request(b'{"model": "m", "prompt": "x", "mirostat": 2}', strict(CompletionRequest))
    assert info.value.param == "mirostat"
    assert strict(CompletionRequest) is strict(CompletionRequest)  # built once


def test_a_message_reaches_the_template_with_its_name_when_it_has_one() -> None:
    req = decode_request(chat(messages='[{"role": "user", "content": "hi", "name": "Ada"}, '
                                       '{"role": "assistant", "content": "hello"}]'),
                         ChatCompletionRequest)
    assert [m.for_template() for m in req.messages] == [
        {"role": "user", "content": "hi", "name": "Ada"},
        {"role": "assistant", "content": "hello"}]
