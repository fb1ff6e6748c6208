"""Admin routes: deployments (launch, list, describe, scale, stop), catalogue, health; and the
node-to-node deployment table that peers pull to stay in sync."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiohttp import web

from meshnode import __version__
from meshnode.engines import InvalidRequest, decode_request
from meshnode.node import (CATALOGUE, INTERNAL_DEPLOYMENTS_PATH, INTERNAL_ENGINES_PATH,
                           INTERNAL_MODEL_FILE_PATH, InvalidDeployment, LaunchRequest,
                           ModelNotFound, UpdateRequest, engine_rows, is_model_path,
                           local_file_spec, unable)

from .keys import NODE

__all__ = ["routes"]

routes = web.RouteTableDef()
_encode = msgspec.json.Encoder().encode


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


_LAUNCH_FIELDS = ", ".join(LaunchRequest.__struct_fields__)


@routes.post("/v1/deployments")
async def launch(request: web.Request) -> web.Response:
    req = decode_request(await request.read(), LaunchRequest,
                         unknown_hint=f"a launch takes {_LAUNCH_FIELDS}")
    view = await request.app[NODE].launch(req)
    return _json(view, status=201)


@routes.get("/v1/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[NODE].views()})


@routes.get("/v1/deployments/{name}")
async def get_deployment(request: web.Request) -> web.Response:
    return _json(request.app[NODE].view(request.match_info["name"]))


@routes.patch("/v1/deployments/{name}")
async def update(request: web.Request) -> web.Response:
    change = decode_request(await request.read(), UpdateRequest, unknown_hint=(
        "PATCH changes replicas, nodes, labels or min_ram_mb; to change anything else, stop "
        "the deployment and launch it again"))
    return _json(await request.app[NODE].update(request.match_info["name"], change))


@routes.delete("/v1/deployments/{name}")
async def stop(request: web.Request) -> web.Response:
    return _json(await request.app[NODE].stop(request.match_info["name"]))


@routes.get("/v1/catalogue")
async def catalogue(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": list(CATALOGUE.values())})


def _model_query(request: web.Request) -> str:
    model = request.query.get("model")
    if not model:
        raise InvalidRequest(f"the model query parameter is required: {request.path}"
                             "?model=NAME", param="model")
    return model


@routes.get("/v1/engines")
async def engines(request: web.Request) -> web.Response:
    """Which engines could run ?model=NAME on each live node (like Xinference's engine
    query): this node's rows, then every peer's in name order (a node that has not the file
    of a model given by path, or did not answer, has one row saying so)."""
    node, model = request.app[NODE], _model_query(request)
    try:
        rows = node.engine_options(model)
    except ModelNotFound as exc:
        if not is_model_path(model):
            raise  # not a catalogue name nor a path: unknown everywhere
        rows = [unable(node.name, str(exc))]
    rows += await engine_rows(model, node.peers.ask)
    return _json({"object": "list", "model": model, "data": rows})


@routes.get(INTERNAL_ENGINES_PATH)
async def internal_engines(request: web.Request) -> web.Response:
    """Node to node: this node's rows for ?model= (404 if it has no such model)."""
    return _json({"object": "list", "data": request.app[NODE].engine_options(
        _model_query(request))})


@routes.get("/v1/cluster/nodes")
async def cluster_nodes(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[NODE].members()})


@routes.post("/v1/cluster/revocations")
async def revocations(request: web.Request) -> web.Response:
    """Adopt a CA-signed revocation list (application/octet-stream, the bytes `meshnode cert
    revoke` makes): verified, kept if its sequence is higher, persisted, spread to every node,
    whose members then drop the revoked nodes. 400 for a list that is not this cluster's."""
    node = request.app[NODE]
    before = node.security.revocation_seq if node.security is not None else 0
    sequence = node.adopt_revocation(await request.read())
    return _json({"object": "revocation_list", "sequence": sequence,
                  "adopted": sequence > before})


@routes.get(INTERNAL_DEPLOYMENTS_PATH)
async def internal_deployments(request: web.Request) -> web.Response:
    """Node to node: the whole deployment table, tombstones included (msgpack), for sync."""
    return web.Response(body=request.app[NODE].deployment_entries(),
                        content_type="application/msgpack")


@routes.get(INTERNAL_MODEL_FILE_PATH)
async def internal_model_file(request: web.Request) -> web.Response:
    """Node to node: the spec of the .gguf file at absolute path `?path=` on this node (a
    launch from a node without it); 404 if there is none."""
    path = request.query.get("path", "")
    if not path:
        raise InvalidDeployment("give the file's absolute path: ?path=/models/x.gguf",
                                param="path")
    return _json(await asyncio.to_thread(local_file_spec, path))


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return _json({"status": "ok", "node": node.name, "version": __version__,
                  "uptime_s": round(time.time() - node.started, 3),
                  "deployments": {v.name: v.status for v in node.views()}})


