"""OpenAI response bodies and stream chunks, built once per event and encoded with msgspec.

Stream invariants (checked by the tests against OpenAI's schemas): one id and one integer
`created` for the whole stream; the first chunk carries the role; `finish_reason` is null
until one final chunk; with include_usage every chunk has `usage: null` and a last chunk with
empty `choices` carries the usage; the stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import msgspec

from .base import Finish

__all__ = [
    "SSE_DONE",
    "ChatStream",
    "CompletionStream",
    "embeddings_response",
    "error_body",
    "rerank_response",
    "sse",
]

_encode = msgspec.json.Encoder().encode
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def usage(finish: Finish | None, prompt: int = 0, completion: int = 0,
          cached: int = 0) -> dict[str, Any]:
    """OpenAI usage; `prompt_tokens_details.cached_tokens` counts the prompt tokens served
    from the engine's prefix cache (what prefix-affine routing is for)."""
    if finish is not None:
        prompt, completion = finish.prompt_tokens, finish.completion_tokens
        cached = finish.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def error_body(message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


class _Stream:
    object_: str
    prefix: str

    def __init__(self, request_id: str, model: str, include_usage: bool,
                 fingerprint: str) -> None:
        self.id = f"{self.prefix}-{request_id}"
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self.id, "object": self.object_, "created": self.created,
                                 "model": self.model, "system_fingerprint": self.fingerprint,
                                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, finish: Finish) -> bytes:
        chunk = self._chunk([])
        chunk["usage"] = usage(finish)
        return sse(chunk)


class ChatStream(_Stream):
    object_ = "chat.completion.chunk"
    prefix = "chatcmpl"

    def first(self) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]))

    def delta(self, text: str) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": {"content": text},
                                 "logprobs": None, "finish_reason": None}]))

    def last(self, finish: Finish) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": finish.reason}]))

    def response(self, text: str, finish: Finish) -> bytes:
        return _encode({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish.reason}],
            "usage": usage(finish),
        })


class CompletionStream(_Stream):
    object_ = "text_completion"
    prefix = "cmpl"

    def first(self) -> bytes:
        return b""

    def delta(self, text: str, index: int = 0) -> bytes:
        return sse(self._chunk([{"index": index, "text": text, "logprobs": None,
                                 "finish_reason": None}]))

    def last(self, finish: Finish, index: int = 0) -> bytes:
        return sse(self._chunk([{"index": index, "text": "", "logprobs": None,
                                 "finish_reason": finish.reason}]))

    def response(self, texts: list[str], finishes: list[Finish]) -> bytes:
        prompt = sum(f.prompt_tokens for f in finishes)
        completion = sum(f.completion_tokens for f in finishes)
        return _encode({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": self.fingerprint,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f.reason}
                        for i, (t, f) in enumerate(zip(texts, finishes))],
            "usage": usage(None, prompt, completion, sum(f.cached_tokens for f in finishes)),
        })


def embeddings_response(vectors: list[list[float]], tokens: int, model: str,
                        encoding_format: str) -> bytes:
    """OpenAI's CreateEmbeddingResponse; base64 is little-endian float32, as OpenAI sends."""
    def encode(v: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        return v
    return _encode({"object": "list", "model": model,
                    "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                             for i, v in enumerate(vectors)],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def rerank_response(request_id: str, scores: list[float], documents: list[str],
                    top_n: int | None, return_documents: bool, tokens: int,
                    model: str) -> bytes:
    """Results sorted by score, each with its original index (Cohere/Jina/Xinference shape)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:top_n]
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": {"text": documents[i]}} if return_documents else {})}
               for i in order]
    return _encode({"id": f"rerank-{request_id}", "model": model, "results": results,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
