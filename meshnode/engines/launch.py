"""What the node tells an engine process to load, passed to it as JSON on its command line."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["EngineLaunch", "ENGINE_NAMES"]

# Names used by --engine, the deployments API and the engine query.
ENGINE_NAMES = ("llama.cpp", "transformers", "vllm", "sglang", "mlx")


class EngineLaunch(msgspec.Struct, frozen=True, kw_only=True):
    engine: str
    """One of ENGINE_NAMES."""
    model_path: str
    """A GGUF file (llama.cpp) or a model folder (the others)."""
    served_name: str
    """The name responses carry in their `model` field: the deployment's name."""
    context_length: int = 4096
    """Context window in tokens; KV cache memory grows linearly with it."""
    abilities: tuple[str, ...] = ("chat", "completion")
    """What the model may be asked: chat, completion, embed, rerank."""
    chat_template: str | None = None
    """A Jinja chat template overriding the model's own; None uses the model's (if any)."""
    threads: int = 0
    """CPU threads for generation; 0 = all cores."""
    max_queue: int = 64
    """Requests waiting for the engine beyond this get 503: a bounded queue, not a growing one."""
    python: str = ""
    """Interpreter of the engine's own virtual environment; empty = the node's interpreter.
    Engines pin conflicting versions (vLLM pins torch), so each may live in its own venv."""
    devices: tuple[int, ...] = ()
    """GPU indices the engine may use (CUDA_VISIBLE_DEVICES); empty = the engine's default."""
    memory_fraction: float = 0.9
    """Share of each GPU's memory the engine may take (vLLM/SGLang); KV cache fills the rest."""
    cache_dir: str = ""
    """Where converted weights are cached (GGUF -> safetensors for transformers, MLX, vLLM)."""
    extra_args: tuple[str, ...] = ()
    """Extra command-line arguments for engines that run their own server (vLLM, SGLang)."""
    prompt_cache_mb: Annotated[int, Meta(ge=0)] = 256
    """llama.cpp: MiB of saved KV states per replica (a multi-prefix prompt cache), so prompts
    that share a prefix with any recent request (several system prompts, several
    conversations) skip re-evaluating it; 0 disables it. SmolLM2-135M takes ~22 KiB a token
    (256 MiB ~ 11,000 tokens); bigger models more. Costs RAM in the engine process, and a
    copy at the end of each request (~1 ms per MiB saved) and before a restoring one
    (~0.3 ms per MiB), against seconds to re-evaluate the same tokens on a CPU."""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> "EngineLaunch":
        return msgspec.json.decode(text, type=cls)
