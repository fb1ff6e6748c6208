"""OpenAI routes: chat completions, completions, embeddings, rerank, models.

A request names a deployment in `model`; any node answers it: `dispatch` sends it to the
replica the router picks (here or on a peer). /v1/models lists every deployment in the
cluster with its ready replicas.
"""

from __future__ import annotations

from aiohttp import web

from meshnode.engines import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    InvalidRequest,
    RerankRequest,
    decode_request,
)
from meshnode.node import DeploymentView, ModelNotFound, request_key

from .forward import dispatch
from .keys import NODE

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, ChatCompletionRequest)
    if "chat" not in request.app[NODE].abilities(req.model):
        raise InvalidRequest(
            f"model {req.model!r} is a base model without a chat template: use "
            "/v1/completions, or launch it with an explicit chat_template",
            param="model", code="model_not_chat")
    return await dispatch(request, req.model, "/v1/chat/completions", body, request_key(req))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, CompletionRequest)
    if "completion" not in request.app[NODE].abilities(req.model):
        raise InvalidRequest(f"model {req.model!r} does not serve completions", param="model")
    return await dispatch(request, req.model, "/v1/completions", body, request_key(req))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, EmbeddingRequest)
    if "embed" not in request.app[NODE].abilities(req.model):
        raise InvalidRequest(f"model {req.model!r} does not serve embeddings", param="model")
    return await dispatch(request, req.model, "/v1/embeddings", body, request_key(req))


@routes.post("/v1/rerank")
@routes.post("/v2/rerank")
@routes.post("/rerank")
async def rerank(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, RerankRequest)
    if "rerank" not in request.app[NODE].abilities(req.model):
        raise InvalidRequest(f"model {req.model!r} does not serve rerank", param="model")
    return await dispatch(request, req.model, "/v1/rerank", body, request_key(req))


def _model(view: DeploymentView) -> dict[str, object]:
    return {"id": view.name, "object": "model", "created": view.created,
            "owned_by": "meshnode",
            "meshnode": {"model": view.model, "engine": view.engine, "status": view.status,
                         "abilities": list(view.abilities),
                         "context_length": view.context_length,
                         "replicas": view.replicas,
                         "ready_replicas": sum(p.state == "ready" for p in view.placed),
                         "nodes": [p.node for p in view.placed if p.state == "ready"]}}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    views = request.app[NODE].views()
    return web.json_response({"object": "list", "data": [_model(v) for v in views]})


@routes.get("/v1/models/{id:.+}")
async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["id"]
    node = request.app[NODE]
    if name not in node.deployments:
        raise ModelNotFound(f"model {name!r} not found: GET /v1/models lists what is served")
    return web.json_response(_model(node.view(name)))
