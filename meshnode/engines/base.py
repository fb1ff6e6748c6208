"""The narrow protocol every in-process engine adapter implements.

The engine host (`host.py`) owns HTTP and the OpenAI wire format; an adapter only turns
messages into a prompt, a prompt into a stream of text pieces, and texts into vectors.
Adapters are blocking and run on the host's single engine thread, so they need no locks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import msgspec

from .errors import ContextOverflow, InvalidRequest
from .schema import ChatMessage, SamplingParams

__all__ = ["Engine", "EngineInfo", "Finish", "Prompt", "completion_budget"]


class EngineInfo(msgspec.Struct, frozen=True):
    """What a loaded model can do, reported on the engine's /health."""

    engine: str
    context_length: int
    chat_template: bool
    abilities: tuple[str, ...]


class Prompt(msgspec.Struct, frozen=True):
    """A prompt ready to generate from: its token ids and, for chat, extra stop token ids."""

    tokens: list[int]
    stop_token_ids: frozenset[int] = frozenset()


class Finish(msgspec.Struct, frozen=True):
    """The last item of a generation: why it ended and what it cost."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV state was reused from an earlier request (not re-evaluated)."""


class Engine(Protocol):
    info: EngineInfo

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        """Apply the model's chat template; InvalidRequest if it has none."""
        ...

    def text_prompt(self, prompt: str | list[int]) -> Prompt:
        """Tokenize a completion prompt (token ids are taken as they are)."""
        ...

    def generate(self, prompt: Prompt, params: SamplingParams,
                 cancel: threading.Event) -> Iterator[str | Finish]:
        """Yield text pieces, then one Finish. Stops early once `cancel` is set."""
        ...

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Vectors for the inputs and the number of tokens they used."""
        ...

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """A relevance score per document (higher is better) and the tokens used."""
        ...

    def close(self) -> None: ...


def completion_budget(prompt: Prompt, params: SamplingParams, context: int) -> int:
    """Tokens this request may generate: max_tokens, or what the context has left.

    InvalidRequest for an empty prompt; ContextOverflow when prompt + max_tokens > context.
    """
    n_prompt = len(prompt.tokens)
    if n_prompt == 0:
        raise InvalidRequest("prompt is empty after tokenization", param="prompt")
    room = context - n_prompt
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if room <= 0 or max_tokens > room:
        raise ContextOverflow(
            f"this model's context is {context} tokens; the prompt uses {n_prompt} and "
            f"{max_tokens} more were asked for: shorten the prompt or lower max_tokens",
            param="messages" if prompt.stop_token_ids else "prompt",
        )
    return max_tokens
