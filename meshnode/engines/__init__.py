"""Engines: one adapter per inference engine, the engine host process, and its supervisor.

Knows nothing of the mesh, the node or HTTP routing. Heavy libraries (llama_cpp, torch, ...)
are imported only inside engine processes.
"""

from .errors import (
    ContextOverflow,
    EngineCrashed,
    EngineError,
    EngineFailed,
    EngineUnavailable,
    InvalidRequest,
)
from .launch import ENGINE_NAMES, EngineLaunch
from .process import EngineProcess, EngineState, SupervisorConfig
from .schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    decode_request,
)

__all__ = [
    "ENGINE_NAMES",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContextOverflow",
    "EmbeddingRequest",
    "EngineCrashed",
    "EngineError",
    "EngineFailed",
    "EngineLaunch",
    "EngineProcess",
    "EngineState",
    "EngineUnavailable",
    "InvalidRequest",
    "SupervisorConfig",
    "decode_request",
]
