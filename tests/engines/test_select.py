"""Engine selection: the best engine that can run a model on a node, or the reason none can."""

from __future__ import annotations

import pytest

from meshnode.engines import EngineOption, EngineUnsupported, Hardware, choose_engine
from meshnode.engines.select import Gpu

CPU = Hardware(cpus=2, ram_mb=24000)
CUDA = Hardware(cpus=16, ram_mb=128000, gpus=(Gpu(index=0, name="H100", memory_mb=80000),))
MAC = Hardware(cpus=8, ram_mb=32000, apple_silicon=True)
ALL = [EngineOption(engine=e, available=True)
       for e in ("llama.cpp", "transformers", "vllm", "sglang", "mlx")]


def pick(formats: tuple[str, ...], abilities: tuple[str, ...], hw: Hardware,
         options: list[EngineOption] = ALL, forced: str | None = None) -> str:
    return choose_engine(formats, abilities, forced, options, hw).engine


def test_chat_models_by_hardware() -> None:
    assert pick(("gguf",), ("chat",), CPU) == "llama.cpp"
    assert pick(("safetensors",), ("chat",), CPU) == "transformers"
    assert pick(("safetensors",), ("chat",), CUDA) == "vllm"
    assert pick(("safetensors",), ("chat",), MAC) == "mlx"
    no_vllm = [o for o in ALL if o.engine != "vllm"]
    assert pick(("safetensors",), ("chat",), CUDA, no_vllm) == "sglang"


def test_embedding_models_keep_their_format() -> None:
    assert pick(("safetensors",), ("embed",), CPU) == "transformers"
    assert pick(("gguf",), ("embed", "rerank"), CPU) == "llama.cpp"  # no conversion


def test_forced_and_impossible_choices_say_why() -> None:
    assert pick(("gguf",), ("chat",), CPU, forced="transformers") == "transformers"
    with pytest.raises(EngineUnsupported, match="unknown engine 'tgi'"):
        pick(("gguf",), ("chat",), CPU, forced="tgi")
    missing = [EngineOption(engine="vllm", available=False, reason="needs a CUDA GPU"), *ALL[:2]]
    with pytest.raises(EngineUnsupported, match="needs a CUDA GPU"):
        pick(("safetensors",), ("chat",), CPU, missing, forced="vllm")
    with pytest.raises(EngineUnsupported, match="no engine on this node"):
        pick(("mlx",), ("chat",), CPU, [EngineOption(engine="llama.cpp", available=True)])
