"""The engine host: one process per model replica, serving OpenAI routes on a Unix socket.

    python -m meshnode.engines.host --socket PATH --parent-pid PID --launch JSON

It binds the socket first (so /health can say "loading"), loads the model on the engine
thread, then serves. All generation runs on that single thread: llama.cpp contexts are not
thread-safe, and one thread at full speed beats two contending for 2 cores. Requests wait in
a bounded queue; a client that goes away cancels its generation between two tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from .base import Engine, Finish, Prompt
from .errors import EngineError, EngineFailed, InvalidRequest
from .launch import EngineLaunch
from .responses import (
    SSE_DONE,
    ChatStream,
    CompletionStream,
    embeddings_response,
    error_body,
    rerank_response,
    sse,
)
from .schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    SamplingParams,
    decode_request,
    format_type,
    strict,
)

__all__ = ["main", "open_engine"]

_END = object()
T = TypeVar("T")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


# Engines that run inside this host process: name -> (module, class). vLLM and SGLang run
# their own OpenAI servers instead (see servers.py).
IN_HOST = {
    "llama.cpp": ("meshnode.engines.llama", "LlamaEngine"),
    "transformers": ("meshnode.engines.transformers", "TransformersEngine"),
    "mlx": ("meshnode.engines.mlx", "MlxEngine"),
}


def open_engine(launch: EngineLaunch) -> Engine:
    """Build the adapter for `launch.engine`; heavy imports happen inside each adapter."""
    target = IN_HOST.get(launch.engine)
    if target is None:
        raise EngineFailed(f"engine {launch.engine!r} cannot run in the engine host")
    module = importlib.import_module(target[0])
    return getattr(module, target[1])(launch)


class Host:
    def __init__(self, launch: EngineLaunch) -> None:
        self.launch = launch
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.waiting = 0
        self.fingerprint = f"meshnode-{launch.engine}"
        self.unknown_hint = (f"the {launch.engine} engine does not support it; remove it, or "
                             "launch the model on an engine that does (vLLM and SGLang "
                             "receive such options unchanged)")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # An adapter that batches requests itself (`concurrent = True`) has its generators
        # iterated on a thread each, so that they run together; threads start on demand.
        self._streams = ThreadPoolExecutor(max_workers=max(1, launch.max_queue),
                                           thread_name_prefix="stream")

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.engine = await loop.run_in_executor(self._executor, open_engine, self.launch)
        except EngineError as exc:
            self.load_error = str(exc) + (f" ({exc.reason})" if getattr(exc, "reason", "") else "")
            raise

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[str | Finish]:
        """Bridge the engine thread's blocking generator to the event loop, token by token."""
        assert self.engine is not None
        wanted = format_type(params.response_format)
        if wanted != "text" and wanted not in getattr(self.engine, "response_formats", ()):
            # Refused, never ignored: unconstrained text would break the client's parser.
            raise InvalidRequest(f"response_format {wanted} is not supported by engine "
                                 f"{self.engine.info.engine}: use an engine that supports it "
                                 "(llama.cpp, vllm) or drop response_format",
                                 param="response_format", code="unsupported_response_format")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        put = queue.put_nowait
        engine = self.engine

        def work() -> None:
            try:
                for item in engine.generate(prompt, params, cancel):
                    loop.call_soon_threadsafe(put, item)
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting coroutine
                loop.call_soon_threadsafe(put, exc)
            finally:
                loop.call_soon_threadsafe(put, _END)

        concurrent = getattr(engine, "concurrent", False)
        future = loop.run_in_executor(self._streams if concurrent else self._executor, work)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            if not future.done():
                # Let the engine thread notice `cancel`; do not wait on it here.
                future.add_done_callback(lambda f: f.exception())

    def close(self) -> None:
        self._streams.shutdown(wait=False, cancel_futures=True)  # engine.close() ends them
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()


_HOST = web.AppKey("host", Host)


def _error(status: int, message: str, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, param, code),
                        content_type="application/json", headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    host = request.app[_HOST]
    if request.path != "/health":
        if host.engine is None:
            return _error(503, "model is loading", "service_unavailable", code="loading",
                          headers={"Retry-After": "2"})
        if host.waiting >= host.launch.max_queue:
            return _error(503, f"engine queue is full ({host.launch.max_queue} waiting)",
                          "service_unavailable", code="overloaded", headers={"Retry-After": "1"})
    else:
        return await handler(request)
    host.waiting += 1
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return _error(400, str(exc), param=exc.param, code=exc.code)
    except EngineError as exc:
        return _error(500, str(exc), "server_error")
    finally:
        host.waiting -= 1


async def health(request: web.Request) -> web.Response:
    host = request.app[_HOST]
    if host.engine is None:
        status = {"status": "failed" if host.load_error else "loading", "error": host.load_error}
        return web.json_response(status, status=503)
    info = host.engine.info
    return web.json_response({"status": "ready", "engine": info.engine,
                              "context_length": info.context_length,
                              "chat_template": info.chat_template,
                              "abilities": list(info.abilities), "waiting": host.waiting})


async def _decode(request: web.Request, schema: type[T]) -> T:
    """The request body as `schema`, refusing any field it does not declare: this engine
    would drop it unseen (schema.py)."""
    return decode_request(await request.read(), strict(schema),
                          unknown_hint=request.app[_HOST].unknown_hint)


def _request_id(request: web.Request) -> str:
    return request.headers.get("X-Request-Id") or os.urandom(12).hex()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    host = request.app[_HOST]
    body = await _decode(request, ChatCompletionRequest)
    prompt = await host.run(host.engine.chat_prompt, body.messages)  # type: ignore[union-attr]
    out = ChatStream(_request_id(request), host.launch.served_name, body.include_usage,
                     host.fingerprint)
    items = host.generate(prompt, body.sampling())
    if not body.stream:
        texts: list[str] = []
        async for item in items:
            if isinstance(item, Finish):
                return web.Response(body=out.response("".join(texts), item),
                                    content_type="application/json")
            texts.append(item)
        raise EngineError("generation ended without finishing")
    return await _stream(request, items, out, out.first())


async def completions(request: web.Request) -> web.StreamResponse:
    host = request.app[_HOST]
    body = await _decode(request, CompletionRequest)
    engine = host.engine
    assert engine is not None
    prompts = [await host.run(engine.text_prompt, p) for p in body.prompts()]
    out = CompletionStream(_request_id(request), host.launch.served_name, body.include_usage,
                     host.fingerprint)
    params = body.sampling()
    if body.stream:
        return await _stream(request, host.generate(prompts[0], params), out, b"")
    texts, finishes = [], []
    for prompt in prompts:
        parts: list[str] = []
        async for item in host.generate(prompt, params):
            if isinstance(item, Finish):
                finishes.append(item)
            else:
                parts.append(item)
        texts.append("".join(parts))
    return web.Response(body=out.response(texts, finishes), content_type="application/json")


async def embeddings(request: web.Request) -> web.Response:
    host = request.app[_HOST]
    body = await _decode(request, EmbeddingRequest)
    engine = host.engine
    assert engine is not None
    vectors, tokens = await host.run(engine.embed, body.inputs())
    if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
        raise InvalidRequest(f"this model's embeddings have {len(vectors[0])} dimensions and "
                             "cannot be shortened", param="dimensions")
    return web.Response(body=embeddings_response(vectors, tokens, host.launch.served_name,
                                                 body.encoding_format),
                        content_type="application/json")


async def rerank(request: web.Request) -> web.Response:
    host = request.app[_HOST]
    body = await _decode(request, RerankRequest)
    engine = host.engine
    assert engine is not None
    documents = body.texts()
    scores, tokens = await host.run(engine.rerank, body.query, documents)
    return web.Response(body=rerank_response(_request_id(request), scores, documents,
                                             body.top_n, body.return_documents, tokens,
                                             host.launch.served_name),
                        content_type="application/json")


async def _stream(request: web.Request, items: AsyncIterator[str | Finish],
                  out: ChatStream | CompletionStream, first: bytes) -> web.StreamResponse:
    # Surface errors raised before the first token (context overflow, ...) as a plain 4xx.
    head = await anext(items)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    if first:
        await response.write(first)
    try:
        item: str | Finish = head
        while True:
            if isinstance(item, Finish):
                await response.write(out.last(item))
                if out.include_usage:
                    await response.write(out.usage_chunk(item))
                break
            await response.write(out.delta(item))
            item = await anext(items)
        await response.write(SSE_DONE)
    except EngineError as exc:
        # An error mid-stream is the stream's last event: no [DONE] after it.
        await response.write(sse({"error": {"message": str(exc), "type": "server_error",
                                            "param": None, "code": None}}))
    await response.write_eof()
    return response


def build_app(host: Host) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[_HOST] = host
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/rerank", rerank)
    return app


def _die_with_parent(parent_pid: int) -> None:
    """No orphans: the kernel kills us when the node dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    if not sys.platform.startswith("linux"):
        def watch() -> None:
            while os.getppid() == parent_pid:
                threading.Event().wait(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()


async def serve(launch: EngineLaunch, socket_path: str) -> None:
    host = Host(launch)
    runner = web.AppRunner(build_app(host), handler_cancellation=True, access_log=None)
    await runner.setup()
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    site = web.UnixSite(runner, socket_path)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await host.load()
        except EngineError as exc:
            print(f"meshnode engine: {host.load_error}", file=sys.stderr, flush=True)
            raise SystemExit(3) from exc
        print(f"meshnode engine: ready {launch.served_name} ({launch.engine})",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        host.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="meshnode-engine")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--launch", required=True, help="EngineLaunch as JSON")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    launch = EngineLaunch.from_json(args.launch)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(launch, args.socket))


if __name__ == "__main__":
    main()
