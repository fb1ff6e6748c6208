"""Continuous batching for a causal LM on CPU: one decode loop, on its own thread, for every
request in flight.

Each loop iteration admits waiting requests (prefilling each one alone, at most
`PREFILL_BUDGET` prompt tokens per iteration, so running streams stall for one bounded prefill)
and then runs one decode step for the whole batch: one forward pass with one new token per row.

Batch state: one KV cache of shape [rows, heads, T, head_dim] per layer, rows LEFT-padded to a
common length T, plus an attention mask [rows, T] (0 = padding) and each row's real length.
A row's next token goes at cache index T with position id = its real length, so rotary
positions are those of the row alone and padding is never attended: a row's tokens do not
depend on what else is in the batch (up to float rounding of batched matmuls).
Joining left-pads the shorter side; leaving drops the row, then the leading columns that
every remaining row has as padding. A request's cache lives only while it runs: no cache is
shared between requests.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

from ..base import Finish
from ..errors import EngineFailed
from ..schema import SamplingParams
from ..stops import StopMatcher
from .sampling import Detokenizer, Sampler

__all__ = ["CANCELLED", "Batcher", "Request"]

log = structlog.get_logger("meshnode.engines")

MAX_ROWS = 16
"""Most requests decoded together. More rows raise throughput (one weight read serves every
row) until matmuls turn compute-bound, and raise each stream's per-token latency."""
PREFILL_BUDGET = 512
"""Prompt tokens prefilled per loop iteration (at least one request): bounds how long a new
request stalls the streams already running."""

CANCELLED = object()
"""Put on a request's queue when it was dropped because its `cancel` was set."""


class Request:
    """One generation in the batch; the batcher writes its text pieces to `out`."""

    def __init__(self, tokens: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids: frozenset[int], cancel: threading.Event, torch: Any,
                 decode: Callable[[list[int]], str]) -> None:
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.cancel = cancel
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sampler = Sampler(torch, params, tokens)
        self.detok = Detokenizer(decode)
        self.stops = StopMatcher(params.stop)
        self.produced = 0
        self.next_token = -1
        """The token sampled last, fed to the model at the next decode step."""

    def accept(self, token: int) -> bool:
        """Emit `token`'s text; True when the request is finished (Finish already sent)."""
        if token in self.stop_ids:
            return self._finish("stop", hit=False)
        self.produced += 1
        text, hit = self.stops.feed(self.detok.add(token))
        if text:
            self.out.put(text)
        if hit:
            return self._finish("stop", hit=True)
        if self.produced >= self.max_tokens:
            return self._finish("length", hit=False)
        self.next_token = token
        return False

    def _finish(self, reason: str, hit: bool) -> bool:
        if not hit:
            tail, hit = self.stops.finish(self.detok.flush())
            if hit:
                reason = "stop"
            if tail:
                self.out.put(tail)
        self.out.put(Finish(reason, len(self.tokens), self.produced))
        return True


class Batcher:
    """Owns the decode thread. `submit` is thread-safe; `close` fails what is still queued."""

    def __init__(self, torch: Any, model: Any,
                 cache_factory: Callable[[list[tuple[Any, Any]]], Any],
                 cache_layers: Callable[[Any], list[tuple[Any, Any]]],
                 cache_arg: str, logits_arg: str | None) -> None:
        self._torch = torch
        self._model = model
        self._new_cache = cache_factory
        self._layers = cache_layers
        self._cache_arg = cache_arg
        self._logits_arg = logits_arg
        self._waiting: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._rows: list[Request] = []
        self._cache: Any = None
        self._mask: Any = None  # [rows, T] long, 0 = padding
        self._lengths: list[int] = []  # real tokens per row in the cache
        self._closed = False
        self.widest = 0
        """Most rows decoded in one step so far."""
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if self._closed:
            raise EngineFailed("the engine is shutting down")
        self._waiting.put(request)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiting.put(None)
        self._thread.join()

    # the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    self._admit(block=not self._rows)
                    if self._rows:
                        self._step()
                except Exception as exc:  # a bug here must not leave streams waiting forever
                    log.exception("batcher.error", rows=len(self._rows))
                    self._fail_all(EngineFailed(f"generation failed: {exc}"), waiting=False)
        finally:
            self._fail_all(EngineFailed("the engine is shutting down"))

    def _admit(self, block: bool) -> None:
        budget = PREFILL_BUDGET
        while len(self._rows) < MAX_ROWS and budget > 0:
            try:
                request = self._waiting.get(block=block)
            except queue.Empty:
                return
            if request is None:  # close()
                return
            block = False
            if request.cancel.is_set():
                request.out.put(CANCELLED)
                continue
            budget -= len(request.tokens)
            self._guarded([request], functools.partial(self._prefill, request))

    def _guarded(self, requests: list[Request], work: Callable[[], None]) -> None:
        """Run a forward pass; a failure fails `requests` (and the batch, if it is involved)."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - torch/transformers errors, translated here
            log.error("batcher.failed", rows=len(requests), error=str(exc))
            failure = EngineFailed(f"generation failed: {exc}")
            for r in requests:
                r.out.put(failure)
            if any(r in self._rows for r in requests):
                self._reset()

    def _prefill(self, request: Request) -> None:
        torch = self._torch
        ids = torch.tensor([request.tokens], dtype=torch.long)
        kwargs: dict[str, Any] = {self._cache_arg: self._new_cache([]), "use_cache": True}
        if self._logits_arg:
            kwargs[self._logits_arg] = 1
        with torch.inference_mode():
            out = self._model(input_ids=ids, **kwargs)
            token = request.sampler.choose(out.logits[0, -1].float())
        if request.accept(token):
            return
        self._join(request, self._layers(getattr(out, self._cache_arg)), len(request.tokens))

    def _step(self) -> None:
        live = [i for i, r in enumerate(self._rows) if not r.cancel.is_set()]
        if len(live) < len(self._rows):
            for r in self._rows:
                if r.cancel.is_set():
                    r.out.put(CANCELLED)
            self._keep(live)
            if not self._rows:
                return
        rows = list(self._rows)
        self._guarded(rows, functools.partial(self._decode, rows))

    def _decode(self, rows: list[Request]) -> None:
        torch = self._torch
        n = len(rows)
        self.widest = max(self.widest, n)
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([[length] for length in self._lengths], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        with torch.inference_mode():
            out = self._model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                              use_cache=True, **{self._cache_arg: self._cache})
            logits = out.logits[:, -1].float()
            self._cache = getattr(out, self._cache_arg)
            self._lengths = [length + 1 for length in self._lengths]
            done = [r.accept(r.sampler.choose(logits[i])) for i, r in enumerate(rows)]
        if any(done):
            self._keep([i for i, d in enumerate(done) if not d])

    # batch state ---------------------------------------------------------------------------

    def _join(self, request: Request, layers: list[tuple[Any, Any]], length: int) -> None:
        torch = self._torch
        mask = torch.ones((1, length), dtype=torch.long)
        if not self._rows:
            self._rows, self._lengths, self._mask = [request], [length], mask
            self._cache = self._new_cache(layers)
            return
        current = self._layers(self._cache)
        width = max(self._mask.shape[1], length)
        merged = [(torch.cat([_pad(torch, k0, width), _pad(torch, k1, width)]),
                   torch.cat([_pad(torch, v0, width), _pad(torch, v1, width)]))
                  for (k0, v0), (k1, v1) in zip(current, layers)]
        self._mask = torch.cat([_pad(torch, self._mask, width), _pad(torch, mask, width)])
        self._cache = self._new_cache(merged)
        self._rows.append(request)
        self._lengths.append(length)

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then drop leading columns that are padding in every row."""
        if not keep:
            self._reset()
            return
        if len(keep) == len(self._rows):
            return
        torch = self._torch
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, index)
        start = int((mask.shape[1] - mask.sum(dim=1)).min())  # shortest left padding
        self._mask = mask[:, start:]
        self._cache = self._new_cache([
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self._layers(self._cache)])
        self._rows = [self._rows[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]

    def _reset(self) -> None:
        self._rows, self._lengths, self._cache, self._mask = [], [], None, None

    def _fail_all(self, error: Exception, waiting: bool = True) -> None:
        for r in self._rows:
            r.out.put(error)
        self._reset()
        while waiting:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.out.put(error)


def _pad(torch: Any, t: Any, width: int) -> Any:
    """Left-pad the sequence axis (-1 for masks, -2 for K/V) with zeros to `width`."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=axis)
