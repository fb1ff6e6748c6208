"""A model given by a path that the launching node does not have: ask the live peers.

`meshnode launch /models/x.gguf` reads the file's size and metadata (abilities) on the node it
is sent to. When that node has no such file, it asks every live peer at once for
`GET /internal/v1/model-file?path=...`; a peer that has the file answers with its spec, and the
launch goes on with the first answer in node-name order. Placement then settles the replica on
a node that has the file (a holder without it fails at once, and the next node takes over).

Only absolute paths of `.gguf` files are looked up on peers: a relative path means nothing on
another machine, and the route answers nothing about other files.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec
import structlog

from .catalogue import ModelSpec, find_spec
from .errors import InvalidDeployment, ModelNotFound
from .sync import PeerVerify, response_ssl_object

__all__ = ["INTERNAL_MODEL_FILE_PATH", "find_spec_anywhere", "local_file_spec", "peer_file_spec"]

log = structlog.get_logger("meshnode.node")

INTERNAL_MODEL_FILE_PATH = "/internal/v1/model-file"

_spec_decoder = msgspec.json.Decoder(ModelSpec)


async def find_spec_anywhere(model: str, peers: Sequence[tuple[str, str, str]], *,
                             ssl_context: ssl.SSLContext | None = None,
                             verify: PeerVerify | None = None) -> ModelSpec:
    """The spec of `model`: the catalogue's, the file's on this node, or else (a path) the
    file's on the first of `peers` that has it (peer_file_spec)."""
    try:
        return find_spec(model)
    except ModelNotFound:
        if not (model.endswith(".gguf") or os.sep in model):  # find_spec's rule for a path
            raise
    return await peer_file_spec(model, peers, ssl_context=ssl_context, verify=verify)


def absolute_path(model: str) -> str:
    """`model` with `~` expanded; InvalidDeployment unless it is then an absolute .gguf path."""
    path = Path(model).expanduser()
    if not path.is_absolute() or path.suffix != ".gguf":
        raise InvalidDeployment(
            f"{model} is not on this node, and only an absolute path of a .gguf file is looked "
            "up on the other nodes: give the file's absolute path", param="model")
    return str(path)


def local_file_spec(model: str) -> ModelSpec:
    """For a peer's lookup: the spec of the .gguf file at absolute path `model` on this node;
    ModelNotFound if there is none, InvalidDeployment for any other path."""
    return find_spec(absolute_path(model))


async def peer_file_spec(model: str, peers: Sequence[tuple[str, str, str]], *,
                         ssl_context: ssl.SSLContext | None = None,
                         verify: PeerVerify | None = None, timeout_s: float = 5.0) -> ModelSpec:
    """The spec of the file at `model` from the first of `peers` ((name, node-to-node URL,
    node id), asked at once) that has it, in name order; ModelNotFound naming who was asked
    and who did not answer."""
    path = absolute_path(model)
    if not peers:
        raise ModelNotFound(f"model file not found: {path} is not on this node, and no other "
                            "node is alive to ask: copy it here, or launch from a node that "
                            "has it")
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def ask(url: str, node_id: str) -> ModelSpec | None:
            async with session.get(url + INTERNAL_MODEL_FILE_PATH,
                                   params={"path": path}) as resp:
                if verify is not None:
                    verify(response_ssl_object(resp), node_id)
                if resp.status == 404:
                    return None
                resp.raise_for_status()
                return _spec_decoder.decode(await resp.read())

        ordered = sorted(peers)
        answers = await asyncio.gather(*(ask(url, node_id) for _, url, node_id in ordered),
                                       return_exceptions=True)
    silent = []
    for (name, _, _), answer in zip(ordered, answers):
        if isinstance(answer, ModelSpec):
            log.info("model_file.found", path=path, node=name)
            return answer
        if isinstance(answer, BaseException):
            log.info("model_file.lookup_failed", path=path, node=name, error=repr(answer))
            silent.append(name)
    asked = ", ".join(name for name, _, _ in ordered)
    unanswered = f" ({', '.join(silent)} did not answer)" if silent else ""
    raise ModelNotFound(f"model file not found: {path} is not on this node nor on {asked}"
                        f"{unanswered}: copy it to a node, or check the path")
