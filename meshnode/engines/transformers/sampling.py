"""Per-request token choice and incremental detokenization for the transformers engine.

Sampling order, as llama.cpp and vLLM apply it: penalties -> temperature -> top_k -> top_p ->
min_p -> draw. temperature 0 is greedy (argmax after penalties). Each request draws from its own
`torch.Generator`, so a seed fixes the draws whatever else shares the batch.

Penalties, as vLLM defines them: `repeat_penalty` r over prompt and output tokens (a positive
logit is divided by r, a negative one multiplied); `frequency_penalty` f and `presence_penalty` p
over output tokens only: logit -= f * count + p * (count > 0).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from ..schema import SamplingParams

__all__ = ["Detokenizer", "Sampler"]


class Sampler:
    def __init__(self, torch: Any, params: SamplingParams, prompt: Sequence[int]) -> None:
        self._torch = torch
        self._p = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        self._seen = set(prompt) if params.repeat_penalty != 1.0 else set()
        self._output: list[int] = []

    def choose(self, logits: Any) -> int:
        """The next token from one row of logits (float, shape [vocab])."""
        torch, p = self._torch, self._p
        logits = self._penalised(logits)
        if p.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            logits = logits / p.temperature
            ids = None
            if 0 < p.top_k < logits.shape[-1]:  # only the k best survive: work on those
                logits, ids = torch.topk(logits, p.top_k)
            probs = torch.softmax(logits, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Drop a token once the mass before it already reaches top_p (keeps >= 1).
                drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
            if p.min_p > 0.0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            pick = int(torch.multinomial(probs, 1, generator=self._gen))
            token = int(ids[pick]) if ids is not None else pick
        self._output.append(token)
        if self._p.repeat_penalty != 1.0:
            self._seen.add(token)
        return token

    def _penalised(self, logits: Any) -> Any:
        torch, p = self._torch, self._p
        if p.repeat_penalty != 1.0 and self._seen:
            ids = torch.tensor(sorted(self._seen), dtype=torch.long)
            picked = logits[ids]
            picked = torch.where(picked > 0, picked / p.repeat_penalty,
                                 picked * p.repeat_penalty)
            logits = logits.index_copy(0, ids, picked)
        if (p.frequency_penalty or p.presence_penalty) and self._output:
            counts = torch.bincount(torch.tensor(self._output), minlength=logits.shape[-1])
            counts = counts[: logits.shape[-1]].to(logits.dtype)
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        return logits


class Detokenizer:
    """Text for a growing list of token ids, released only once it is complete.

    Decodes the window [prefix, end) against [prefix, read): the difference is new text; text
    ending in U+FFFD waits for the rest of its UTF-8 sequence. Keeping one already-read token
    as context preserves the leading space that SentencePiece tokenizers drop at the start.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is sent as U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""
