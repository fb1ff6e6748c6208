"""MLX adapter (mlx-lm), run inside the engine host process.

`mlx` and `mlx_lm` are imported only here, inside the engine process. MLX loads safetensors
folders; a GGUF file is converted once into `launch.cache_dir` (convert.py). Generation drives
`mlx_lm.generate.generate_step` token by token, so token counts are exact, cancellation is
checked between tokens, and stop sequences are matched on decoded text.

KV cache: the previous request's cache is kept and trimmed to the longest common prefix with
the next prompt, which is what prefix-affine routing counts on. A seeded request, and one with
penalties (whose window must see the whole prompt), starts from an empty cache instead, so the
same seed gives the same tokens.

On Linux `mlx[cpu]` runs on the CPU (its wheel bundles a reference BLAS, so it is slower than
llama.cpp there and `launch.threads` has no effect); on Apple silicon it runs on Metal.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import structlog

from .base import EngineInfo, Finish, Prompt, completion_budget
from .errors import EngineFailed, InvalidRequest
from .launch import EngineLaunch
from .schema import ChatMessage, SamplingParams
from .stops import StopMatcher

__all__ = ["MlxEngine"]

log = structlog.get_logger("meshnode.engines")

# llama.cpp's default penalty window (penalty_last_n), so both engines penalise alike.
PENALTY_WINDOW = 64
# Prompt tokens run per forward pass; cancellation is checked between chunks. A GPU wants big
# chunks (mlx-lm's default). mlx[cpu] gains little from batching (~0.2 CPU s per token of a
# 135M model, prompt or not, with the wheel's reference BLAS), so small chunks there bound how
# long a cancelled prompt keeps running (64 tokens: ~10 s).
PREFILL_CHUNK_GPU = 2048
PREFILL_CHUNK_CPU = 64


class _Cancelled(Exception):
    """Raised from mlx-lm's prefill progress callback to stop a cancelled prompt early."""


class MlxEngine:
    def __init__(self, launch: EngineLaunch) -> None:
        try:
            import mlx.core as mx
            import mlx_lm
            from mlx_lm.generate import generate_step
            from mlx_lm.models import cache as kv
            from mlx_lm.sample_utils import make_logits_processors, make_sampler
        except ImportError as exc:
            raise EngineFailed("MLX engine is not installed",
                               reason="pip install 'meshnode[mlx]'") from exc
        # Typed Any: mlx-lm's annotations are looser than what it returns (generate_step
        # yields int tokens, load(return_config=True) a triple).
        self._mx: Any = mx
        self._kv: Any = kv
        self._generate_step: Any = generate_step
        self._make_sampler: Any = make_sampler
        self._make_processors: Any = make_logits_processors
        load: Any = mlx_lm.load
        path = _weights_folder(launch)
        try:
            self._model, self._tokenizer, config = load(path, return_config=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EngineFailed(f"mlx-lm could not load {path}: {exc}") from exc
        text_config = config.get("text_config") or config
        trained = text_config.get("max_position_embeddings")
        n_ctx = min(launch.context_length, trained) if trained else launch.context_length
        self._n_vocab = max(len(self._tokenizer), text_config.get("vocab_size") or 0)
        self._eos = frozenset(self._tokenizer.eos_token_ids)
        self._template = launch.chat_template
        has_template = bool(self._template or self._tokenizer.has_chat_template)
        chat = has_template and "chat" in launch.abilities
        self._prefill_chunk = PREFILL_CHUNK_CPU if mx.default_device() == mx.cpu \
            else PREFILL_CHUNK_GPU
        self._cache: list[Any] | None = None
        self._cached: list[int] = []  # the tokens whose keys and values `_cache` holds
        self.info = EngineInfo(
            engine="mlx",
            context_length=n_ctx,
            chat_template=chat,
            abilities=tuple(a for a in launch.abilities if a != "chat" or chat),
        )
        log.info("mlx.loaded", path=path, context_length=n_ctx, device=str(mx.default_device()))

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        if not self.info.chat_template:
            raise InvalidRequest(
                "this model has no chat template (it is a base model): use /v1/completions,"
                " or launch it with an explicit chat_template",
                param="messages", code="no_chat_template",
            )
        from jinja2 import TemplateError

        try:
            text = self._tokenizer.apply_chat_template(
                [m.for_template() for m in messages],
                tokenize=False, add_generation_prompt=True, chat_template=self._template)
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template refused these messages: {exc}",
                                 param="messages") from None
        # The template writes its own special tokens (BOS included), as transformers does.
        tokens = self._tokenizer.encode(text, add_special_tokens=False)
        return Prompt(tokens=tokens, stop_token_ids=self._eos)

    def text_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, list):
            if any(t < 0 or t >= self._n_vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {self._n_vocab})", param="prompt")
            return Prompt(tokens=list(prompt))
        return Prompt(tokens=self._tokenizer.encode(prompt))

    def generate(self, prompt: Prompt, params: SamplingParams,
                 cancel: threading.Event) -> Iterator[str | Finish]:
        n_prompt = len(prompt.tokens)
        max_tokens = completion_budget(prompt, params, self.info.context_length)
        if max_tokens == 0:
            yield Finish("length", n_prompt, 0)
            return
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._mx.random.seed(seed & 0xFFFFFFFF)
        sampler = self._make_sampler(temp=params.temperature, top_p=params.top_p,
                                     min_p=params.min_p, top_k=params.top_k)
        processors = self._make_processors(
            repetition_penalty=params.repeat_penalty if params.repeat_penalty != 1.0 else None,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )
        todo = self._reuse_cache(prompt.tokens, fresh=params.seed is not None or bool(processors))
        eos = self._eos | prompt.stop_token_ids
        detokenizer = _Detokenizer(self._tokenizer, prompt.tokens)
        stops = StopMatcher(params.stop)
        produced = 0
        reason = "length"
        stopped_by_string = False

        def progress(done: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled

        steps = self._generate_step(self._mx.array(todo), self._model, max_tokens=-1,
                                    sampler=sampler, logits_processors=processors or None,
                                    prompt_cache=self._cache, prefill_step_size=self._prefill_chunk,
                                    prompt_progress_callback=progress)
        try:
            for token, _ in steps:
                # generate_step has already fed `token` to the model to compute the next one.
                self._cached.append(token)
                if cancel.is_set():
                    return
                if token in eos:
                    reason = "stop"
                    break
                produced += 1
                text, stopped_by_string = stops.feed(detokenizer.add(token))
                if text:
                    yield text
                if stopped_by_string:
                    reason = "stop"
                    break
                if produced >= max_tokens:
                    break
        except _Cancelled:
            self._cache = None  # the prompt ran in part: start the next request afresh
            return
        except Exception:
            self._cache = None
            raise
        finally:
            steps.close()
        if not stopped_by_string:
            tail, _ = stops.finish(detokenizer.flush())
            if tail:
                yield tail
        yield Finish(reason, n_prompt, produced)

    def _reuse_cache(self, tokens: list[int], fresh: bool) -> list[int]:
        """Point `_cache` at a cache holding a prefix of `tokens`; return the tokens left to run."""
        keep = 0
        if not fresh and self._cache is not None:
            for a, b in zip(self._cached, tokens):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(tokens) - 1)  # the last prompt token must run to give logits
            excess = len(self._cached) - keep
            if keep and excess and (not self._kv.can_trim_prompt_cache(self._cache)
                                    or self._kv.trim_prompt_cache(self._cache, excess) != excess):
                keep = 0
        if keep == 0:
            self._cache = self._kv.make_prompt_cache(self._model)
        self._cached = list(tokens)  # once the prompt has run
        return tokens[keep:]

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        raise InvalidRequest("the MLX engine does not serve embeddings", param="model")

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        raise InvalidRequest("the MLX engine does not serve rerank", param="model")

    def close(self) -> None:
        self._cache = None
        self._model = None
        self._mx.clear_cache()


def _weights_folder(launch: EngineLaunch) -> str:
    path = launch.model_path
    if os.path.isdir(path):
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        from .convert import ensure_safetensors

        return ensure_safetensors(path, launch.cache_dir)
    if not os.path.exists(path):
        raise EngineFailed(f"model not found: {path}")
    raise EngineFailed(f"MLX loads safetensors folders or GGUF files, not {path}")


class _Detokenizer:
    """Incremental decoding, exact for byte-level BPE and SentencePiece alike.

    Each step decodes a short window (ending at the newest token) twice, without and with the
    tokens not yet released, and releases the difference once it does not end in a partial
    UTF-8 character (U+FFFD). The window starts on the prompt's last tokens so that a leading
    space of the first generated word survives (SentencePiece drops it at a text's start).
    """

    CONTEXT = 5  # prompt tokens that open the window

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt[-self.CONTEXT:])
        self._start = 0  # the window: ids[start:]
        self._read = len(self._ids)  # ids before this have been released

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def _release(self, final: bool) -> str:
        before = self._decode(self._ids[self._start:self._read])
        after = self._decode(self._ids[self._start:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._ids = self._ids[self._read:]
        self._start, self._read = 0, len(self._ids)
        return after[len(before):]

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)
