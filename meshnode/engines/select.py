"""Which engines this machine can run, and which one should run a given model.

Preference, best first, among engines whose package imports (in the node's Python or in the
engine's own venv) and that accept one of the model's formats:

    CUDA GPUs:      vllm > sglang > transformers > llama.cpp
    Apple silicon:  mlx > llama.cpp > transformers
    CPU:            llama.cpp (GGUF) > transformers (safetensors) > vllm > mlx

Embedding and rerank models go to transformers (or llama.cpp for GGUF). A forced engine that
cannot run the model is refused with the reason.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

import msgspec

from .errors import EngineUnsupported
from .launch import ENGINE_NAMES

__all__ = ["ENGINE_FORMATS", "EngineOption", "Hardware", "choose_engine", "detect_hardware",
           "probe_engines"]

# Formats each engine loads; gguf for transformers/MLX/vLLM means "converted once, cached".
ENGINE_FORMATS: dict[str, frozenset[str]] = {
    "llama.cpp": frozenset({"gguf"}),
    "transformers": frozenset({"safetensors", "gguf"}),
    "mlx": frozenset({"safetensors", "mlx", "gguf"}),
    "vllm": frozenset({"safetensors", "gguf"}),
    "sglang": frozenset({"safetensors"}),
}
ENGINE_ABILITIES: dict[str, frozenset[str]] = {
    "llama.cpp": frozenset({"chat", "completion", "embed", "rerank"}),
    "transformers": frozenset({"chat", "completion", "embed", "rerank"}),
    "mlx": frozenset({"chat", "completion"}),
    "vllm": frozenset({"chat", "completion"}),
    "sglang": frozenset({"chat", "completion"}),
}
_PACKAGES = {"llama.cpp": "llama_cpp", "transformers": "transformers", "mlx": "mlx_lm",
             "vllm": "vllm", "sglang": "sglang"}
_NEEDS_CUDA = {"sglang"}


class Gpu(msgspec.Struct, frozen=True):
    index: int
    name: str
    memory_mb: int


class Hardware(msgspec.Struct, frozen=True, kw_only=True):
    cpus: int
    ram_mb: int
    gpus: tuple[Gpu, ...] = ()
    apple_silicon: bool = False


class EngineOption(msgspec.Struct, frozen=True, kw_only=True):
    """Whether this node can run an engine, with which interpreter, or why not."""

    engine: str
    available: bool
    python: str = ""
    reason: str = ""


def detect_hardware() -> Hardware:
    ram_mb = 0
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        pass
    gpus: list[Gpu] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,name,memory.total",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            for line in out.strip().splitlines():
                index, name, memory = (x.strip() for x in line.split(","))
                gpus.append(Gpu(int(index), name, int(float(memory))))
        except (OSError, subprocess.SubprocessError, ValueError):
            gpus = []
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return Hardware(cpus=os.cpu_count() or 1, ram_mb=ram_mb, gpus=tuple(gpus),
                    apple_silicon=apple)


def _importable(python: str, package: str) -> bool:
    if python in ("", sys.executable):
        import importlib.util
        try:
            return importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            return False
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) is None)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def probe_engines(hardware: Hardware, pythons: Mapping[str, str] | None = None) -> list[EngineOption]:
    """What this node can run. `pythons` maps an engine to its own venv's interpreter."""
    options = []
    for engine in ENGINE_NAMES:
        python = (pythons or {}).get(engine, "")
        if engine in _NEEDS_CUDA and not hardware.gpus:
            options.append(EngineOption(engine=engine, available=False, python=python,
                                        reason="needs a CUDA GPU"))
        elif _importable(python, _PACKAGES[engine]):
            options.append(EngineOption(engine=engine, available=True, python=python))
        else:
            where = f" in {python}" if python else ""
            options.append(EngineOption(engine=engine, available=False, python=python,
                                        reason=f"package {_PACKAGES[engine]!r} is not "
                                               f"installed{where}"))
    return options


def _preference(hardware: Hardware, abilities: Sequence[str],
                formats: Sequence[str]) -> list[str]:
    if {"embed", "rerank"} & set(abilities):
        # A GGUF-only model runs as it is on llama.cpp; transformers would convert it first.
        if set(formats) == {"gguf"}:
            return ["llama.cpp", "transformers"]
        return ["transformers", "llama.cpp"]
    if hardware.gpus:
        return ["vllm", "sglang", "transformers", "llama.cpp", "mlx"]
    if hardware.apple_silicon:
        return ["mlx", "llama.cpp", "transformers", "vllm"]
    return ["llama.cpp", "transformers", "vllm", "mlx"]


def choose_engine(formats: Sequence[str], abilities: Sequence[str], forced: str | None,
                  options: Sequence[EngineOption], hardware: Hardware) -> EngineOption:
    """The engine to run a model with these formats and abilities, or EngineUnsupported."""
    by_name = {o.engine: o for o in options}
    if forced is not None:
        if forced not in ENGINE_NAMES:
            raise EngineUnsupported(f"unknown engine {forced!r}: choose one of "
                                    f"{', '.join(ENGINE_NAMES)}")
        option = by_name.get(forced)
        if option is None or not option.available:
            reason = option.reason if option else "not probed"
            raise EngineUnsupported(f"engine {forced!r} is not available on this node: {reason}")
        if not ENGINE_FORMATS[forced] & set(formats):
            raise EngineUnsupported(f"engine {forced!r} cannot load this model's formats "
                                    f"({', '.join(formats)})")
        missing = set(abilities) & {"embed", "rerank"} - ENGINE_ABILITIES[forced]
        if missing:
            raise EngineUnsupported(f"engine {forced!r} does not serve {', '.join(missing)}")
        return option
    reasons = []
    for name in _preference(hardware, abilities, formats):
        option = by_name.get(name)
        if option is None:
            continue
        if not option.available:
            reasons.append(f"{name}: {option.reason}")
        elif not ENGINE_FORMATS[name] & set(formats):
            reasons.append(f"{name}: cannot load {', '.join(formats)}")
        elif {"embed", "rerank"} & set(abilities) - ENGINE_ABILITIES[name]:
            reasons.append(f"{name}: no embeddings")
        else:
            return option
    raise EngineUnsupported("no engine on this node can run it (" + "; ".join(reasons) + ")")
