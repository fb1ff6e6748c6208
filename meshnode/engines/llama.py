"""llama.cpp adapter (llama-cpp-python), run inside the engine host process.

`llama_cpp` is imported only here, inside the engine process. Generation drives
`Llama.generate` token by token (rather than `create_completion`) so that token counts are
exact, cancellation is checked between tokens, and stop sequences are matched on decoded
text. `Llama.generate` reuses the longest matching prefix of the previous prompt's KV cache,
which is what prefix-affine routing counts on. A multi-prefix prompt cache (prompt_cache.py)
keeps the KV states of recent requests besides the live one: before a request, the saved state
sharing the longest prefix with the prompt is restored into the context when it beats what the
context holds (llama.cpp's per-sequence state API, sequence 0; not `Llama.save_state`, which
copies the whole n_batch x n_vocab scores array); after it, the context's state is saved.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import structlog

from .base import EngineInfo, Finish, Prompt, completion_budget
from .errors import EngineFailed, InvalidRequest
from .launch import EngineLaunch
from .prompt_cache import MIB, PromptCache, common_prefix
from .schema import (
    STRUCTURED_FORMATS,
    ChatMessage,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    SamplingParams,
)
from .similarity import cosine_scores
from .stops import StopMatcher

__all__ = ["LlamaEngine"]

log = structlog.get_logger("meshnode.engines")

EMBED_BATCH = 2048
"""Most tokens one embedding input may have (n_batch = n_ubatch of an embedding context)."""


class LlamaEngine:
    # Both are compiled to a GBNF grammar that constrains sampling token by token.
    response_formats = STRUCTURED_FORMATS

    def __init__(self, launch: EngineLaunch) -> None:
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format
        except ImportError as exc:
            raise EngineFailed(
                "llama.cpp engine is not installed", reason="pip install 'meshnode[llama]'"
            ) from exc
        if not os.path.isfile(launch.model_path):
            raise EngineFailed(f"model file not found: {launch.model_path}")
        self._llama_cpp = llama_cpp
        threads = launch.threads or (os.cpu_count() or 1)
        embedding = "embed" in launch.abilities
        # An embedding model reads each input in one micro-batch (non-causal pooling needs it
        # whole), so the per-input limit is n_batch = n_ubatch; generation keeps 512.
        n_batch = min(EMBED_BATCH if embedding else 512, launch.context_length)
        self._llm = self._load(launch, threads, n_batch, embedding,
                               llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if embedding and self._llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            # The GGUF declares no pooling (a generative model used for embeddings): pool by
            # the mean of the token vectors, one vector per input as OpenAI's API returns.
            self._llm.close()
            self._llm = self._load(launch, threads, n_batch, embedding,
                                   llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        self._vocab = self._llm._model.vocab
        # Embedding contexts decode unrelated batches: nothing to keep between requests.
        self._cache = PromptCache.from_mb(0 if embedding else launch.prompt_cache_mb)
        template = launch.chat_template or self._llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template and "chat" in launch.abilities:
            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        self._add_bos = self._llm._model.add_bos_token()
        abilities = tuple(a for a in launch.abilities if a != "chat" or self._formatter)
        self.info = EngineInfo(
            engine="llama.cpp",
            context_length=self._llm.n_ctx(),
            chat_template=self._formatter is not None,
            abilities=abilities,
        )

    def _load(self, launch: EngineLaunch, threads: int, n_batch: int, embedding: bool,
              pooling: int) -> Any:
        try:
            return self._llama_cpp.Llama(
                model_path=launch.model_path,
                n_ctx=launch.context_length,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=n_batch,
                n_ubatch=n_batch if embedding else 512,
                embedding=embedding,
                pooling_type=pooling,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineFailed(f"llama.cpp could not load {launch.model_path}: {exc}") from exc

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        if self._formatter is None:
            raise InvalidRequest(
                "this model has no chat template (it is a base model): use /v1/completions,"
                " or launch it with an explicit chat_template",
                param="messages", code="no_chat_template",
            )
        rendered = self._formatter(
            messages=[m.for_template() for m in messages]
        )
        tokens = self._llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        return Prompt(tokens=tokens, stop_token_ids=frozenset(self._formatter.stop_token_ids or ()))

    def text_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, list):
            n_vocab = self._llm.n_vocab()
            if any(t < 0 or t >= n_vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {n_vocab})", param="prompt")
            return Prompt(tokens=list(prompt))
        return Prompt(tokens=self._llm.tokenize(prompt.encode("utf-8"),
                                                add_bos=self._add_bos, special=True))

    def generate(self, prompt: Prompt, params: SamplingParams,
                 cancel: threading.Event) -> Iterator[str | Finish]:
        n_ctx = self._llm.n_ctx()
        n_prompt = len(prompt.tokens)
        max_tokens = completion_budget(prompt, params, n_ctx)
        if max_tokens == 0:
            yield Finish("length", n_prompt, 0)
            return
        grammar = self._grammar(params.response_format)  # InvalidRequest before any state
        if params.seed is not None:
            # Logits from a prefix-cached decode differ in the last bits from a full-prompt
            # decode (other batch shapes), which changes sampled text: a seeded request
            # re-evaluates its whole prompt so the same seed gives the same tokens.
            self._llm.reset()
        else:
            self._restore(prompt.tokens)
        cached = self._reused_prefix(prompt.tokens)
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._llm.set_seed(seed & 0xFFFFFFFF)
        is_eog = self._llama_cpp.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        produced = 0
        reason = "length"
        stopped_by_string = False
        cancelled = False
        tokens = self._llm.generate(
            prompt.tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens:
                if cancel.is_set():
                    cancelled = True
                    break
                if is_eog(self._vocab, token) or token in prompt.stop_token_ids:
                    reason = "stop"
                    break
                produced += 1
                text, stopped_by_string = stops.feed(decoder.decode(self._llm.detokenize([token])))
                if text:
                    yield text
                if stopped_by_string:
                    reason = "stop"
                    break
                if produced >= max_tokens:
                    break
        finally:
            tokens.close()
        self._save()  # not reached when decoding raised: the context may then be partial
        if cancelled:
            return
        if not stopped_by_string:
            tail, _ = stops.finish(decoder.decode(b"", final=True))
            if tail:
                yield tail
        yield Finish(reason, n_prompt, produced, cached)

    def _reused_prefix(self, tokens: list[int]) -> int:
        """Prompt tokens `Llama.generate` will take from the KV cache rather than evaluate:
        the longest common prefix with what the context holds; when that is the whole prompt
        but the context holds more, or its logits are not live (a restored state), it replays
        the last token to get fresh logits."""
        llm = self._llm
        held = llm.n_tokens
        if held == 0:
            return 0
        common = common_prefix(llm.input_ids[:held].tolist(), tokens)
        if common == len(tokens) and (held != len(tokens) or llm._requires_eval):
            return max(common - 1, 0)
        return common

    def _restore(self, tokens: list[int]) -> None:
        """Load the saved state sharing the longest prefix with `tokens` into sequence 0 if it
        beats what the context holds. Afterwards input_ids[:n_tokens] are exactly the tokens
        whose keys and values the context holds, and `Llama.generate` trims the rest."""
        if not self._cache.enabled:
            return
        hit = self._cache.lookup(tokens, better_than=self._reused_prefix(tokens))
        if hit is None:
            return
        entry, usable = hit
        llm, lib = self._llm, self._llama_cpp
        start = time.perf_counter()
        read = lib.llama_state_seq_set_data(llm._ctx.ctx, entry.state, entry.size, 0)
        if read != entry.size:
            # The sequence is now empty or partial: start the context over.
            log.warning("prompt_cache.restore_failed", tokens=len(entry.tokens),
                        bytes=entry.size, read=read)
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.reset()
            return
        n = len(entry.tokens)
        llm.input_ids[:n] = entry.tokens
        llm.n_tokens = n
        llm._requires_eval = True  # a restored state carries no logits
        log.debug("prompt_cache.restore", tokens=n, reused=usable, mib=round(entry.size / MIB, 2),
                  ms=round((time.perf_counter() - start) * 1000, 2))

    def _save(self) -> None:
        """Save the context's state (the prompt and the tokens generated and evaluated) as the
        most recent cache entry, unless a saved entry already holds it."""
        llm, lib = self._llm, self._llama_cpp
        held = llm.n_tokens
        if not self._cache.enabled or held == 0:
            return
        tokens = llm.input_ids[:held].tolist()
        if self._cache.covers(tokens):
            return
        ctx = llm._ctx.ctx
        llm._ctx.kv_cache_seq_rm(-1, held, -1)  # the state holds exactly input_ids[:held]
        size = lib.llama_state_seq_get_size(ctx, 0)
        if size > self._cache.budget_bytes:
            return
        start = time.perf_counter()
        state = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(ctx, state, size, 0) != size:
            log.warning("prompt_cache.save_failed", tokens=held, bytes=size)
            return
        self._cache.save(tokens, state, size)
        log.debug("prompt_cache.save", tokens=held, mib=round(size / MIB, 2),
                  ms=round((time.perf_counter() - start) * 1000, 2),
                  entries=len(self._cache), used_mib=round(self._cache.used_bytes / MIB, 1))

    def _grammar(self, response_format: ResponseFormat | None) -> object | None:
        """The LlamaGrammar for a structured response_format; None for plain text.

        Once the grammar is complete it allows only end-of-generation, so a JSON answer ends
        by itself; a max_tokens cut can still leave it unfinished (finish_reason "length")."""
        if isinstance(response_format, JsonObjectFormat) or (
                isinstance(response_format, JsonSchemaFormat)
                and response_format.json_schema.schema is None):
            return self._llama_cpp.LlamaGrammar.from_string(
                self._llama_cpp.llama_grammar.JSON_GBNF, verbose=False)
        if isinstance(response_format, JsonSchemaFormat):
            schema = response_format.json_schema.schema
            loose = _unenforced(schema, "$")
            if loose and response_format.json_schema.strict:
                raise InvalidRequest(
                    "response_format json_schema is strict, but llama.cpp's grammar cannot "
                    f"enforce {', '.join(loose)}: drop those keywords, or set strict to false "
                    "to have the rest of the schema enforced",
                    param="response_format.json_schema.schema", code="invalid_json_schema")
            gbnf = _schema_grammar(json.dumps(schema))  # key order = the output's key order
            return self._llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
        return None

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        """Unit-length vectors (as llama.cpp's server returns), in input order.

        Text is tokenized as `Llama.embed` does (BOS, no special tokens), so a vector equals
        `Llama.embed(text, normalize=True)` in-process; token ids are taken as they are.
        An input longer than n_batch tokens is refused, never truncated silently."""
        if "embed" not in self.info.abilities:
            raise InvalidRequest("this model does not serve embeddings: launch it as an "
                                 "embedding deployment", param="model")
        llm = self._llm
        n_vocab, limit = llm.n_vocab(), llm.n_batch
        seqs: list[list[int]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, list):
                if any(t < 0 or t >= n_vocab for t in item):
                    raise InvalidRequest(f"token ids must be in [0, {n_vocab})",
                                         param=f"input[{i}]")
                tokens = item
            else:
                tokens = llm.tokenize(item.encode("utf-8"))
            if len(tokens) > limit:
                raise InvalidRequest(
                    f"input {i} has {len(tokens)} tokens; this model embeds at most {limit} "
                    "per input: split or shorten it", param="input", code="input_too_long")
            seqs.append(tokens)
        return self._embed_tokens(seqs), sum(len(t) for t in seqs)

    def _embed_tokens(self, seqs: list[list[int]]) -> list[list[float]]:
        """Decode sequences packed into batches of <= n_batch tokens and <= n_seq_max
        sequences (as `Llama.embed` packs them) and read each one's pooled vector."""
        import numpy as np
        llm, lib = self._llm, self._llama_cpp
        n_embd, limit = llm.n_embd(), llm.n_batch
        n_seq_max = llm.context_params.n_seq_max
        batch = llm._batch
        vectors: list[list[float]] = []
        group = 0
        used = 0

        def flush() -> None:
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(batch)
            batch.reset()
            for seq in range(group):
                v = np.ctypeslib.as_array(lib.llama_get_embeddings_seq(llm._ctx.ctx, seq),
                                          shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(v))
                vectors.append((v / norm if norm else v).tolist())

        batch.reset()
        for tokens in seqs:
            if used + len(tokens) > limit or group >= n_seq_max:
                flush()
                group = used = 0
            batch.add_sequence(tokens, group, True)
            group += 1
            used += len(tokens)
        flush()
        llm._ctx.kv_cache_clear()  # as Llama.embed leaves it: no prefix for a later generate
        llm.reset()
        return vectors

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        vectors, tokens = self.embed([query, *documents])
        return cosine_scores(vectors[0], vectors[1:]), tokens

    def close(self) -> None:
        self._llm.close()


# JSON Schema keywords that llama-cpp-python's schema-to-grammar converter (0.3.x) ignores:
# a grammar does not count or compare numbers. (Enforced: type, enum, const, properties,
# required, additionalProperties, items, prefixItems, min/maxItems, min/maxLength, pattern,
# anyOf/oneOf/allOf, $ref, and the date/time/uuid formats.)
UNENFORCED = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                        "multipleOf", "minProperties", "maxProperties", "uniqueItems",
                        "contains", "minContains", "maxContains", "not", "if", "then",
                        "else", "dependentRequired", "dependentSchemas", "patternProperties",
                        "propertyNames"})


def _unenforced(schema: object, path: str) -> list[str]:
    """`keyword at path` for each keyword of `schema` that the grammar would not enforce."""
    if not isinstance(schema, dict):
        return []
    found = [f"{k} at {path}" for k in schema if k in UNENFORCED]
    for key in ("properties", "$defs", "definitions"):
        named = schema.get(key)
        if isinstance(named, dict):
            where = path if key == "properties" else f"{path}.{key}"
            for name, sub in named.items():
                found += _unenforced(sub, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        found += _unenforced(schema.get(key), f"{path}.{key}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        subs = schema.get(key)
        if isinstance(subs, list):
            for i, sub in enumerate(subs):
                found += _unenforced(sub, f"{path}.{key}[{i}]")
    return found


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema: str) -> str:
    """GBNF for a JSON schema (as JSON text), cached: the conversion runs in Python."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    try:
        return json_schema_to_gbnf(schema)
    except Exception as exc:  # noqa: BLE001 - the converter asserts, or trips on wrong types
        raise InvalidRequest(
            f"response_format.json_schema.schema is not a JSON schema that llama.cpp can "
            f"follow: {exc or type(exc).__name__}; fix the schema (a JSON Schema object such "
            'as {"type": "object", "properties": {...}, "required": [...]})',
            param="response_format.json_schema.schema", code="invalid_json_schema") from None
