"""llama.cpp adapter (llama-cpp-python), run inside the engine host process.

`llama_cpp` is imported only here, inside the engine process. Generation drives
`Llama.generate` token by token (rather than `create_completion`) so that token counts are
exact, cancellation is checked between tokens, and stop sequences are matched on decoded
text. `Llama.generate` reuses the longest matching prefix of the previous prompt's KV cache,
which is what prefix-affine routing counts on.
"""

from __future__ import annotations

import codecs
import os
import random
import threading
from collections.abc import Iterator, Sequence

from .base import EngineInfo, Finish, Prompt, completion_budget
from .errors import EngineFailed, InvalidRequest
from .launch import EngineLaunch
from .schema import ChatMessage, SamplingParams
from .similarity import cosine_scores
from .stops import StopMatcher

__all__ = ["LlamaEngine"]


class LlamaEngine:
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
        try:
            self._llm = llama_cpp.Llama(
                model_path=launch.model_path,
                n_ctx=launch.context_length,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=min(512, launch.context_length),
                embedding="embed" in launch.abilities,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineFailed(f"llama.cpp could not load {launch.model_path}: {exc}") from exc
        self._vocab = self._llm._model.vocab
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

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> Prompt:
        if self._formatter is None:
            raise InvalidRequest(
                "this model has no chat template (it is a base model): use /v1/completions,"
                " or launch it with an explicit chat_template",
                param="messages", code="no_chat_template",
            )
        rendered = self._formatter(
            messages=[{"role": m.role, "content": m.text()} for m in messages]
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
        if params.seed is not None:
            # Logits from a prefix-cached decode differ in the last bits from a full-prompt
            # decode (other batch shapes), which changes sampled text: a seeded request
            # re-evaluates its whole prompt so the same seed gives the same tokens.
            self._llm.reset()
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self._llm.set_seed(seed & 0xFFFFFFFF)
        is_eog = self._llama_cpp.llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        produced = 0
        reason = "length"
        stopped_by_string = False
        tokens = self._llm.generate(
            prompt.tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )
        try:
            for token in tokens:
                if cancel.is_set():
                    return
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
        if not stopped_by_string:
            tail, _ = stops.finish(decoder.decode(b"", final=True))
            if tail:
                yield tail
        yield Finish(reason, n_prompt, produced)

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if "embed" not in self.info.abilities:
            raise InvalidRequest("this model does not serve embeddings", param="model")
        vectors: list[list[float]] = []
        used = 0
        for item in inputs:
            tokens = item if isinstance(item, list) else self._llm.tokenize(
                item.encode("utf-8"), add_bos=self._add_bos, special=True)
            used += len(tokens)
            vectors.append(self._llm.embed(self._llm.detokenize(tokens).decode("utf-8", "replace")))
        return vectors, used

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        vectors, tokens = self.embed([query, *documents])
        return cosine_scores(vectors[0], vectors[1:]), tokens

    def close(self) -> None:
        self._llm.close()
