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

from .errors import Handler
from .forward import answer
from .keys import NODE

__all__ = ["routes"]

routes = web.RouteTableDef()


def _not_served(model: str, ability: str) -> InvalidRequest:
    if ability == "chat":
        return InvalidRequest(
            f"model {model!r} is a base model without a chat template: use /v1/completions, "
            "or launch it with an explicit chat_template", param="model", code="model_not_chat")
    what = {"completion": "completions", "embed": "embeddings"}.get(ability, ability)
    return InvalidRequest(f"model {model!r} does not serve {what}", param="model")


def _inference(path: str, schema: type, ability: str) -> Handler:
    """A thin handler: decode and check the body, then route it to a replica unchanged.
    What a request asks is checked here only for a model on meshnode's engine host; vLLM's
    and SGLang's servers judge their own (Node.checks)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = decode_request(body, schema, check=False)
        node = request.app[NODE]
        if ability not in node.abilities(req.model):
            raise _not_served(req.model, ability)
        if node.checks(req.model):
            req.check()
        return await answer(request, req.model, path, body, request_key(req))
    return handler


for _path, _schema, _ability, _aliases in (
        ("/v1/chat/completions", ChatCompletionRequest, "chat", ()),
        ("/v1/completions", CompletionRequest, "completion", ()),
        ("/v1/embeddings", EmbeddingRequest, "embed", ()),
        ("/v1/rerank", RerankRequest, "rerank", ("/v2/rerank", "/rerank"))):
    for _alias in (_path, *_aliases):
        routes.post(_alias)(_inference(_path, _schema, _ability))


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
