"""Questions a node asks all its live peers at once, over the node-to-node API.

- Where is a model file? `meshnode launch /models/x.gguf` reads the file's size and metadata
  (abilities) on the node it is sent to. When that node has no such file, it asks every live
  peer for `GET /internal/v1/model-file?path=...`; a peer that has the file answers with its
  spec, and the launch goes on with the first answer in node-name order. Placement then
  settles the replica on a node that has the file (a holder without it fails at once, and the
  next node takes over). Only absolute paths of `.gguf` files are looked up on peers: a
  relative path means nothing on another machine, and the route answers nothing about other
  files.
- Which engines could run a model? `GET /v1/engines?model=` gathers every live node's own
  answer (`GET /internal/v1/engines?model=`), since only a node knows its hardware, packages
  and files.

A question is one GET per peer, all at once, bounded by `timeout_s`; a peer that does not
answer in time is named, never waited for longer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import aiohttp
import msgspec
import structlog

from .catalogue import ModelSpec, find_spec, is_model_path
from .errors import InvalidDeployment, ModelNotFound
from .sync import PeerVerify, response_ssl_object

__all__ = ["INTERNAL_ENGINES_PATH", "INTERNAL_MODEL_FILE_PATH", "Answer", "Ask", "Contact",
           "ask_peers", "engine_rows", "find_spec_anywhere", "local_file_spec", "unable"]

log = structlog.get_logger("meshnode.node")

INTERNAL_MODEL_FILE_PATH = "/internal/v1/model-file"
INTERNAL_ENGINES_PATH = "/internal/v1/engines"
ANSWER_MAX = 1 << 20
"""Bytes of a peer's answer read at most (a spec or an engine list is a few KB)."""

Contact = tuple[str, str, str]
"""A live peer: (name, node-to-node base URL, node id)."""


class Answer(NamedTuple):
    """One peer's answer to a question."""
    node: str
    status: int = 0
    """200 or 404; 0 when it did not answer (then `error` says why)."""
    body: bytes = b""
    error: BaseException | None = None


Ask = Callable[[str, dict[str, str]], Awaitable[list[Answer]]]
"""Node.ask_peers: GET a node-to-node path with a query from every live peer."""


class _Error(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error = msgspec.field(default_factory=_Error)


_spec_decoder = msgspec.json.Decoder(ModelSpec)
class _Rows(msgspec.Struct):
    data: list[dict[str, object]]


_rows_decoder = msgspec.json.Decoder(_Rows)
_error_decoder = msgspec.json.Decoder(_ErrorBody)


async def ask_peers(peers: Sequence[Contact], path: str, params: dict[str, str], *,
                    ssl_context: ssl.SSLContext | None = None,
                    verify: PeerVerify | None = None, timeout_s: float = 5.0
                    ) -> list[Answer]:
    """GET `path?params` from every peer at once; the answers in name order."""
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def ask(url: str, node_id: str) -> tuple[int, bytes]:
            async with session.get(url + path, params=params) as resp:
                if verify is not None:
                    verify(response_ssl_object(resp), node_id)
                if resp.status != 404:
                    resp.raise_for_status()
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > ANSWER_MAX:
                        raise ValueError(f"answer over {ANSWER_MAX} bytes")
                return resp.status, bytes(body)

        ordered = sorted(peers)
        results = await asyncio.gather(*(ask(url, node_id) for _, url, node_id in ordered),
                                       return_exceptions=True)
    answers: list[Answer] = []
    for (name, _, _), result in zip(ordered, results):
        if isinstance(result, BaseException):
            log.info("peer.no_answer", path=path, node=name, error=repr(result))
            answers.append(Answer(name, error=result))
        else:
            answers.append(Answer(name, *result))
    return answers


def _not_found(body: bytes) -> str:
    """The message of a peer's 404 error body."""
    try:
        return _error_decoder.decode(body).error.message or "not found"
    except msgspec.DecodeError:
        return "not found"


# Where is a model file? -------------------------------------------------------------------

def absolute_path(model: str) -> str:
    """`model` with `~` expanded; InvalidDeployment unless it is then an absolute .gguf path."""
    try:
        path = Path(model).expanduser()
    except RuntimeError as exc:  # ~nobody
        raise InvalidDeployment(f"invalid model path {model[:256]!r}: {exc}",
                                param="model") from None
    if not path.is_absolute() or path.suffix != ".gguf":
        raise InvalidDeployment(
            f"{model[:256]!r} is not on this node, and only an absolute path of a .gguf file is "
            "looked up on the other nodes: give the file's absolute path", param="model")
    return str(path)


def local_file_spec(model: str) -> ModelSpec:
    """For a peer's lookup: the spec of the .gguf file at absolute path `model` on this node;
    ModelNotFound if there is none, InvalidDeployment for any other path."""
    return find_spec(absolute_path(model))


async def find_spec_anywhere(model: str, ask: Ask) -> ModelSpec:
    """The spec of `model`: the catalogue's, the file's on this node, or else (a path) the
    file's on the first live peer, by name, that has it. ModelNotFound naming the nodes
    asked and those that did not answer."""
    try:
        return find_spec(model)
    except ModelNotFound:
        if not is_model_path(model):
            raise
    path = absolute_path(model)
    answers = await ask(INTERNAL_MODEL_FILE_PATH, {"path": path})
    if not answers:
        raise ModelNotFound(f"model file not found: {path} is not on this node, and no other "
                            "node is alive to ask: copy it here, or launch from a node that "
                            "has it")
    silent = []
    for answer in answers:
        if answer.status == 200:
            try:
                spec = _spec_decoder.decode(answer.body)
            except msgspec.DecodeError as exc:
                log.info("peer.bad_answer", path=path, node=answer.node, error=str(exc))
                silent.append(answer.node)
                continue
            log.info("model_file.found", path=path, node=answer.node)
            return spec
        if answer.status == 0:
            silent.append(answer.node)
    asked = ", ".join(answer.node for answer in answers)
    unanswered = f" ({', '.join(silent)} did not answer)" if silent else ""
    raise ModelNotFound(f"model file not found: {path} is not on this node nor on {asked}"
                        f"{unanswered}: copy it to a node, or check the path")


# Which engines could run a model? ---------------------------------------------------------

def unable(node: str, reason: str) -> dict[str, object]:
    """The one row of a node that cannot say which engines could run the model."""
    return {"engine": "", "available": False, "reason": reason, "default": False,
            "node": node}


async def engine_rows(model: str, ask: Ask) -> list[dict[str, object]]:
    """Every live peer's rows for `model` (engine_choice.options), or one row saying why a
    peer has none (the model is not there, or it did not answer)."""
    rows: list[dict[str, object]] = []
    for answer in await ask(INTERNAL_ENGINES_PATH, {"model": model}):
        name = answer.node
        if answer.status == 0:
            rows.append(unable(name, f"did not answer: {answer.error!r}"))
        elif answer.status == 404:
            rows.append(unable(name, _not_found(answer.body)))
        else:
            try:
                rows += [{**row, "node": name}
                         for row in _rows_decoder.decode(answer.body).data]
            except msgspec.DecodeError as exc:
                rows.append(unable(name, f"answered what is not a list of engines: {exc}"))
    return rows
