"""OpenAI request bodies, as the node and the engine host both decode them.

Field order follows OpenAI's reference (CreateChatCompletionRequest, CreateCompletionRequest).
Fields we know and cannot honour (n > 1, tools, logprobs, ...) are refused with a 400 naming
the parameter. A field we do not know passes the node (vLLM's and SGLang's servers take
options of their own), and the engine host refuses it (`strict`): llama.cpp, transformers
and MLX would drop it. Either way nothing a client asked for is dropped silently.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from .errors import InvalidRequest

__all__ = [
    "STRUCTURED_FORMATS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "ImagePart",
    "JsonObjectFormat",
    "JsonSchema",
    "JsonSchemaFormat",
    "RerankRequest",
    "ResponseFormat",
    "SamplingParams",
    "StreamOptions",
    "TextFormat",
    "TextPart",
    "decode_request",
    "format_type",
    "strict",
]

Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
MAX_STOP_SEQUENCES = 4
MAX_BATCH = 2048


class TextPart(msgspec.Struct, tag_field="type", tag="text", frozen=True):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url", frozen=True):
    image_url: dict[str, Any]


class ChatMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as a chat template reads it: role, content and, when given, name
        (the template decides whether a participant's name shows)."""
        out = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        """The message's text; image parts are refused before this is called."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class TextFormat(msgspec.Struct, tag_field="type", tag="text", frozen=True):
    """Plain text: what every engine produces without constraint."""


class JsonObjectFormat(msgspec.Struct, tag_field="type", tag="json_object", frozen=True):
    """Any JSON object (OpenAI's "JSON mode")."""


SCHEMA_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class JsonSchema(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's ResponseFormatJSONSchema.json_schema, in its field order."""

    description: str | None = None
    name: Annotated[str, Meta(pattern=SCHEMA_NAME)]
    schema: dict[str, Any] | None = None
    """None means any JSON object, as OpenAI reads an absent schema."""
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema", frozen=True):
    """JSON that validates against `json_schema.schema`."""

    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
STRUCTURED_FORMATS = ("json_object", "json_schema")
"""response_format types that constrain the output; engines list the ones they honour."""


def format_type(response_format: ResponseFormat | None) -> str:
    """The response_format's `type`; "text" when absent."""
    if response_format is None:
        return "text"
    return str(response_format.__struct_config__.tag)


class SamplingParams(msgspec.Struct, frozen=True):
    """What an engine needs to generate, once the request has been checked."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    frequency_penalty: float
    presence_penalty: float
    top_k: int
    min_p: float
    repeat_penalty: float
    response_format: ResponseFormat | None = None
    """A structured-output constraint; None or TextFormat = unconstrained text."""


class _Common(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    presence_penalty: Penalty = 0.0
    # OpenAI has it on chat only; llama.cpp's and vLLM's servers accept it on completions too.
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: str | None = None
    # Extensions that llama.cpp, vLLM and SGLang also accept.
    top_k: Annotated[int, Meta(ge=0)] = 40
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repeat_penalty: Annotated[float, Meta(gt=0.0)] = 1.0

    def _check_common(self) -> None:
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported yet", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true",
                                 param="stream_options")
        stops = self.stops()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed",
                                 param="stop")
        if any(s == "" for s in stops):
            raise InvalidRequest("stop sequences must not be empty", param="stop")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _params(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            response_format=None if isinstance(self.response_format, TextFormat)
            else self.response_format,
        )


class ChatCompletionRequest(_Common, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # OpenAI fields that leave the answer as it is: accepted and not acted on (any value:
    # an external engine's server judges them itself), except prompt_cache_key, which joins
    # the prompt's prefix in the routing key (as at OpenAI).
    metadata: Any = None
    parallel_tool_calls: Any = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    service_tier: Any = None
    store: Any = None

    def check(self) -> None:
        """Refuse what cannot be honoured; raises InvalidRequest."""
        self._check_common()
        if self.logprobs or self.top_logprobs:
            raise InvalidRequest("logprobs are not supported yet", param="logprobs")
        if self.tools:
            raise InvalidRequest("tools are not supported yet", param="tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidRequest("max_tokens and max_completion_tokens disagree",
                                 param="max_completion_tokens")
        for i, message in enumerate(self.messages):
            if message.role == "tool":
                raise InvalidRequest("tool messages are not supported yet",
                                     param=f"messages[{i}].role")
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ImagePart):
                        raise InvalidRequest("image input is not supported by this model",
                                             param=f"messages[{i}].content[{j}]")
            elif message.content is None and message.role != "assistant":
                raise InvalidRequest("content is required", param=f"messages[{i}].content")

    def sampling(self) -> SamplingParams:
        return self._params(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Common, frozen=True, kw_only=True):
    prompt: str | list[Any]
    echo: bool = False
    logprobs: int | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = 16
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._check_common()
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported yet", param="logprobs")
        if self.echo:
            raise InvalidRequest("echo is not supported yet", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported yet",
                                 param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("only best_of=1 is supported", param="best_of")
        prompts = self.prompts()
        if not prompts:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if len(prompts) > 1 and self.stream:
            raise InvalidRequest("streaming supports a single prompt", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids (InvalidRequest for anything else)."""
        return _inputs(self.prompt, "prompt")

    def sampling(self) -> SamplingParams:
        return self._params(self.max_tokens)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(type(t) is int for t in x)


def _inputs(value: str | list[Any], param: str) -> list[str | list[int]]:
    """Normalise OpenAI's string | strings | token ids | lists of token ids."""
    if isinstance(value, str):
        return [value]
    if value and _is_ids(value):
        return [list(value)]
    if all(isinstance(x, str) or (_is_ids(x) and x) for x in value):
        return list(value)
    raise InvalidRequest(
        f"{param} must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids", param=param)


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    input: str | list[Any]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        return _inputs(self.input, "input")

    def check(self) -> None:
        inputs = self.inputs()
        if not inputs or any(x == "" for x in inputs):
            raise InvalidRequest("input must not be empty", param="input")
        if len(inputs) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} inputs per request", param="input")


class RerankDocument(msgspec.Struct, frozen=True):
    text: str


class RerankRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    query: Annotated[str, Meta(min_length=1)]
    documents: list[str | RerankDocument]
    top_n: Annotated[int, Meta(ge=1)] | None = None
    return_documents: bool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def check(self) -> None:
        if not self.documents:
            raise InvalidRequest("documents must not be empty", param="documents")
        if len(self.documents) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} documents per request",
                                 param="documents")
        if any(not t for t in self.texts()):
            raise InvalidRequest("documents must not be empty strings", param="documents")


_decoders: dict[type, msgspec.json.Decoder] = {}


T = TypeVar("T")


_UNKNOWN = "Object contains unknown field `"


def decode_request(body: bytes, cls: type[T], check: bool = True,
                   unknown_hint: str = "") -> T:
    """Decode and check a request body; every failure is an InvalidRequest naming the param.
    `check=False` skips the request's own `check()` (what the engine cannot honour): a node
    that forwards the request leaves that to the node that serves it. `unknown_hint` follows
    the message of a field that `cls` refuses as unknown (what to do instead)."""
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        request = decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if unknown_hint and message.startswith(_UNKNOWN):
            message = f"{message}: {unknown_hint}"
        raise InvalidRequest(message, param=_param_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if check:
        checks = getattr(request, "check", None)
        if checks is not None:
            checks()
    return request


@functools.cache
def strict(cls: type[T]) -> type[T]:
    """`cls` refusing a field it does not declare (Object contains unknown field `x`), for
    an engine that would otherwise drop it unseen. The node and the external engines' servers
    take the lenient `cls`: vLLM's and SGLang's own options pass through to them."""
    return msgspec.defstruct(cls.__name__, [], bases=(cls,), frozen=True, kw_only=True,
                             forbid_unknown_fields=True, module=cls.__module__)


def _param_of(message: str) -> str | None:
    # msgspec ends a validation message with "- at `$.messages[0].role`".
    marker = "- at `$."
    at = message.rfind(marker)
    if at < 0:
        if message.startswith(("Object missing required field `", _UNKNOWN)):
            return message.split("`")[1]
        return None
    return message[at + len(marker):].rstrip("`")
