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
    EngineUnsupported,
    InvalidRequest,
)
from .launch import ENGINE_NAMES, EngineLaunch
from .process import EngineProcess, EngineState, SupervisorConfig
from .select import EngineOption, Hardware, choose_engine, detect_hardware, probe_engines
from .servers import SERVER_ENGINES, Command, check_engine_args, command_for
from .schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
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
    "EngineUnsupported",
    "EngineOption",
    "Hardware",
    "Command",
    "check_engine_args",
    "choose_engine",
    "command_for",
    "detect_hardware",
    "probe_engines",
    "InvalidRequest",
    "RerankRequest",
    "SERVER_ENGINES",
    "SupervisorConfig",
    "decode_request",
]
