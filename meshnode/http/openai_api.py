"""OpenAI routes: chat completions, completions, models."""

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
from meshnode.node import DeploymentView, ModelNotFound

from .keys import NODE
from .relay import relay

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, ChatCompletionRequest)
    node = request.app[NODE]
    replica = node.replica(req.model)
    if "chat" not in replica.abilities:
        raise InvalidRequest(
            f"model {req.model!r} is a base model without a chat template: use "
            "/v1/completions, or launch it with an explicit chat_template",
            param="model", code="model_not_chat")
    return await relay(request, replica, "/v1/chat/completions", body, node.name)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, CompletionRequest)
    node = request.app[NODE]
    replica = node.replica(req.model)
    if "completion" not in replica.abilities:
        raise InvalidRequest(f"model {req.model!r} does not serve completions", param="model")
    return await relay(request, replica, "/v1/completions", body, node.name)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, EmbeddingRequest)
    node = request.app[NODE]
    replica = node.replica(req.model)
    if "embed" not in replica.abilities:
        raise InvalidRequest(f"model {req.model!r} does not serve embeddings", param="model")
    return await relay(request, replica, "/v1/embeddings", body, node.name)


@routes.post("/v1/rerank")
@routes.post("/v2/rerank")
@routes.post("/rerank")
async def rerank(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    req = decode_request(body, RerankRequest)
    node = request.app[NODE]
    replica = node.replica(req.model)
    if "rerank" not in replica.abilities:
        raise InvalidRequest(f"model {req.model!r} does not serve rerank", param="model")
    return await relay(request, replica, "/v1/rerank", body, node.name)


def _model(view: DeploymentView) -> dict[str, object]:
    return {"id": view.name, "object": "model", "created": view.created,
            "owned_by": "meshnode",
            "meshnode": {"model": view.model, "engine": view.engine, "status": view.status,
                         "abilities": list(view.abilities),
                         "context_length": view.context_length,
                         "replicas": view.replicas,
                         "ready_replicas": sum(p.state == "ready" for p in view.placed)}}


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
