"""API key authentication of the public app (Bearer), and which role may call what.

When keys are required (`keys_required`), every request but `/health` needs
`Authorization: Bearer mnk_<id>_<secret>` naming a live key (node/keys.py):
- no key, a malformed, unknown, wrong, revoked or expired one: 401, code `invalid_api_key`;
- a user key outside the inference routes (deployments, keys, cluster, ...): 403;
- a user key restricted to some models, on a request for another one: 403; its GET /v1/models
  lists only those models.
Admin keys may call everything. `/internal/` paths (node-to-node table sync) stay open on an
open cluster, whose peers have no credentials; a signed cluster serves them on its mTLS listener,
so here they need an admin key. The model of an inference request is read from its JSON body,
which aiohttp caches, so the handler reads the same bytes again.
"""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from meshnode.node import ApiKey, Node, NodeConfig, is_loopback

from .errors import Handler, error_response
from .keys import NODE

__all__ = ["API_KEY", "auth_middleware", "inference_allowed", "keys_required"]

log = structlog.get_logger("meshnode.http")

API_KEY = web.RequestKey("api_key", ApiKey)
OPEN_PATHS = frozenset({"/health"})
INFERENCE_POSTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                             "/v1/rerank", "/rerank", "/v2/rerank"})


class _Model(msgspec.Struct):
    model: str | None = None


_model_decoder = msgspec.json.Decoder(_Model)


def keys_required(config: NodeConfig) -> bool:
    """See NodeConfig.api_keys."""
    if config.api_keys != "auto":
        return config.api_keys == "required"
    return bool(config.ca_cert) or (not is_loopback(config.host) and not config.insecure)


def inference_allowed(node: Node, authorization: str | None, model: str) -> bool:
    """Whether an Authorization header value may run inference on `model` (the front's check;
    a False goes to the middleware, which says why)."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    key = node.api_keys.authenticate(presented.strip())
    return key is not None and (key.role == "admin" or key.allows_model(model))


def _unauthorized(message: str) -> web.Response:
    """401 with the body OpenAI itself sends for a bad key (type invalid_request_error)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "invalid_api_key"}}
    return web.Response(status=401, body=msgspec.json.encode(body),
                        content_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="meshnode"'})


def _forbidden(message: str, param: str | None = None) -> web.Response:
    return error_response(403, message, param=param, code="permission_denied")


async def _requested_model(request: web.Request) -> str | None:
    if request.method == "POST" and request.path in INFERENCE_POSTS:
        try:
            return _model_decoder.decode(await request.read()).model
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # the handler answers 400 for a malformed body
    if request.method == "GET" and request.path.startswith("/v1/models/"):
        return request.path[len("/v1/models/"):]
    return None


def _is_inference(request: web.Request) -> bool:
    return (request.method == "POST" and request.path in INFERENCE_POSTS) or (
        request.method == "GET" and (request.path == "/v1/models"
                                     or request.path.startswith("/v1/models/")))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    if request.path in OPEN_PATHS or not keys_required(node.config) or (
            request.path.startswith("/internal/") and not node.config.ca_cert):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return _unauthorized("this node requires an API key: send 'Authorization: Bearer "
                             "mnk_...'; an admin makes one with `meshnode keys create`")
    key = node.api_keys.authenticate(presented.strip())
    if key is None:
        return _unauthorized("invalid API key (unknown, revoked or expired): ask an admin for "
                             "a new one (`meshnode keys create`)")
    request[API_KEY] = key
    if key.role != "admin":
        if not _is_inference(request):
            return _forbidden(f"API key {key.id} has role {key.role!r}; "
                              f"{request.method} {request.path} needs an admin key")
        model = await _requested_model(request)
        if model is not None and not key.allows_model(model):
            return _forbidden(f"API key {key.id} may not use model {model!r} (allowed: "
                              f"{', '.join(key.models)})", param="model")
    with structlog.contextvars.bound_contextvars(api_key=key.id):
        response = await handler(request)
    if key.role != "admin" and key.models and request.path == "/v1/models":
        _only_allowed(response, key)
    return response


def _only_allowed(response: web.StreamResponse, key: ApiKey) -> None:
    """GET /v1/models for a user key limited to some models lists only those."""
    if not isinstance(response, web.Response) or response.status != 200 or \
            not isinstance(response.body, bytes):
        return
    listing = msgspec.json.decode(response.body)
    listing["data"] = [m for m in listing.get("data", []) if m.get("id") in key.models]
    response.body = msgspec.json.encode(listing)
