"""transformers adapter (PyTorch on CPU), run inside the engine host process.

Abilities chat/completion load `AutoModelForCausalLM`; embed/rerank load a sentence-transformers
folder (or a cross-encoder) through `encoders.py`. `launch.model_path` is a model folder, or a
.gguf file converted once into `launch.cache_dir` (convert.py).

Generation is batched: `generate()` hands the request to a `Batcher` whose own thread decodes
every request in flight together, and the generator yields that request's pieces as they come.
So the host must iterate generators concurrently, one thread each: `concurrent = True` tells it
to. Prompts, embeddings and rerank still run on the host's single engine thread.

torch and transformers are imported only in the constructor, inside the engine process.
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from ..base import EngineInfo, Finish, Prompt, completion_budget
from ..convert import ensure_safetensors
from ..errors import EngineFailed, InvalidRequest
from ..launch import EngineLaunch
from ..schema import ChatMessage, SamplingParams
from ..similarity import cosine_scores
from .batching import CANCELLED, Batcher, Request
from .encoders import CrossEncoder, SentenceEncoder, is_cross_encoder

__all__ = ["TransformersEngine"]

log = structlog.get_logger("meshnode.engines")

_GENERATE = {"chat", "completion"}


class TransformersEngine:
    concurrent = True
    """The host iterates `generate()` on a thread per request (see host.py)."""

    def __init__(self, launch: EngineLaunch) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the Hub
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # OpenMP threads that spin while waiting lose whole scheduler slices when the cores are
        # shared (other replicas, the node): measured 3-10x slower decode steps on a busy
        # 2-core machine. Passive waiting costs little when the machine is idle. Read by
        # libgomp when torch loads, so it only takes effect before the first `import torch`.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise EngineFailed("transformers engine is not installed",
                               reason="pip install 'meshnode[transformers]'") from exc
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self._torch = torch
        threads = launch.threads or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        folder = Path(launch.model_path)
        if folder.suffix == ".gguf":
            folder = Path(ensure_safetensors(str(folder), launch.cache_dir))
        if not folder.is_dir():
            raise EngineFailed(f"model folder not found: {folder}")
        self._lock = threading.Lock()  # the tokenizer, shared by the engine and batcher threads
        self._batcher: Batcher | None = None
        self._encoder: SentenceEncoder | CrossEncoder | None = None
        self._template: str | None = None
        try:
            if _GENERATE & set(launch.abilities):
                info = self._load_causal(transformers, folder, launch)
            else:
                info = self._load_encoder(transformers, folder, launch)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise EngineFailed(f"transformers could not load {folder}: {exc}",
                               reason=type(exc).__name__) from exc
        self.info = info
        log.info("engine.loaded", engine="transformers", folder=str(folder), threads=threads,
                 abilities=list(info.abilities), context_length=info.context_length)

    # loading --------------------------------------------------------------------------------

    def _load_causal(self, transformers: Any, folder: Path, launch: EngineLaunch) -> EngineInfo:
        torch = self._torch
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        self._tokenizer, self._model = tokenizer, model
        self._vocab = model.get_input_embeddings().num_embeddings
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)
        self._template = launch.chat_template or tokenizer.chat_template
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self._context = min(launch.context_length, max_positions or launch.context_length)
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        logits_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params),
                          None)
        self._batcher = Batcher(torch, model, _cache_factory(transformers), _cache_layers,
                                cache_arg, logits_arg)
        abilities = tuple(a for a in launch.abilities
                          if a in _GENERATE and (a != "chat" or self._template))
        return EngineInfo(engine="transformers", context_length=self._context,
                          chat_template=self._template is not None, abilities=abilities)

    def _load_encoder(self, transformers: Any, folder: Path, launch: EngineLaunch) -> EngineInfo:
        if is_cross_encoder(folder):
            self._encoder = CrossEncoder(self._torch, transformers, folder)
            abilities: tuple[str, ...] = ("rerank",)
        else:
            self._encoder = SentenceEncoder(self._torch, transformers, folder)
            abilities = tuple(a for a in launch.abilities if a in ("embed", "rerank"))
        return EngineInfo(engine="transformers", context_length=self._encoder.context_length,
                          chat_template=False, abilities=abilities)

    # prompts --------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        if self._batcher is None:
            raise InvalidRequest("this model does not generate text", param="model")
        if self._template is None:
            raise InvalidRequest(
                "this model has no chat template (it is a base model): use /v1/completions,"
                " or launch it with an explicit chat_template",
                param="messages", code="no_chat_template",
            )
        import jinja2
        conversation = [m.for_template() for m in messages]
        try:
            with self._lock:
                text = self._tokenizer.apply_chat_template(
                    conversation, chat_template=self._template, add_generation_prompt=True,
                    tokenize=False)
                tokens = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the chat template refused these messages: {exc}",
                                 param="messages") from exc
        return Prompt(tokens=list(tokens), stop_token_ids=self._eos)

    def text_prompt(self, prompt: str | list[int]) -> Prompt:
        if self._batcher is None:
            raise InvalidRequest("this model does not generate text", param="model")
        if isinstance(prompt, list):
            if any(t < 0 or t >= self._vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {self._vocab})", param="prompt")
            return Prompt(tokens=list(prompt))
        with self._lock:
            tokens = self._tokenizer(prompt)["input_ids"]
        return Prompt(tokens=list(tokens))

    # generation -----------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams,
                 cancel: threading.Event) -> Iterator[str | Finish]:
        batcher = self._batcher
        if batcher is None:
            raise InvalidRequest("this model does not generate text", param="model")
        n_prompt = len(prompt.tokens)
        max_tokens = completion_budget(prompt, params, self._context)
        if max_tokens == 0:
            yield Finish("length", n_prompt, 0)
            return
        request = Request(list(prompt.tokens), params, max_tokens,
                          self._eos | prompt.stop_token_ids, cancel, self._torch, self._decode)
        batcher.submit(request)
        try:
            while True:
                try:
                    item = request.out.get(timeout=1.0)
                except queue.Empty:
                    if not batcher.alive:
                        raise EngineFailed("the generation thread stopped") from None
                    continue
                if item is CANCELLED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            cancel.set()  # a consumer that stops early frees its batch row

    def _decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

    # embeddings and rerank -----------------------------------------------------------------

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if not isinstance(self._encoder, SentenceEncoder) or "embed" not in self.info.abilities:
            raise InvalidRequest("this model does not serve embeddings", param="model")
        return self._encoder.encode(inputs, "input")

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        encoder = self._encoder
        if encoder is None or "rerank" not in self.info.abilities:
            raise InvalidRequest("this model does not serve rerank", param="model")
        if isinstance(encoder, CrossEncoder):
            return encoder.scores(query, documents)
        (q,), q_tokens = encoder.encode([query], "query")
        vectors, d_tokens = encoder.encode(list(documents), "documents")
        return cosine_scores(q, vectors), q_tokens + d_tokens

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()


def _cache_factory(transformers: Any) -> Any:
    """A DynamicCache holding the given per-layer (keys, values); empty for []."""
    def build(layers: list[tuple[Any, Any]]) -> Any:
        cache = transformers.DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache
    return build


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer (keys, values) of a DynamicCache: `layers` (>= 4.56) or key/value lists."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
