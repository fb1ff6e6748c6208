"""GGUF -> safetensors, once: the folder the transformers, MLX and vLLM engines load.

    ensure_safetensors(gguf_path, cache_dir) -> folder

transformers reads the GGUF (`from_pretrained(folder, gguf_file=name)`), dequantizes it and
`save_pretrained` writes model, tokenizer and chat template as a plain folder. Invariants:

- The folder is keyed by the GGUF's name, size and mtime (`<stem>-<16 hex>`), so a replaced
  file converts again and an unchanged one never does.
- It is written to a temporary sibling and renamed into place: a crash leaves no half folder,
  only a `.tmp-*` sibling that the next conversion removes.
- An exclusive lock file (`flock`) per key serialises converters, across processes too: the
  second one waits, then finds the folder ready.

Conversion holds the dequantized model in memory: about 4 bytes per parameter (float32).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from .errors import EngineFailed

__all__ = ["ensure_safetensors"]

log = structlog.get_logger("meshnode.engines")

# Written last into a finished folder; a folder without it is not ours (or not finished).
_MARKER = "meshnode-converted.json"


def ensure_safetensors(gguf_path: str, cache_dir: str) -> str:
    """The safetensors model folder converted from `gguf_path`, converting it if needed.

    Blocking (tens of seconds for a 100M-parameter model). Raises EngineFailed when the file
    is missing, transformers cannot read it, or transformers/torch/gguf are not installed.
    """
    source = Path(gguf_path).expanduser().resolve()
    try:
        stat = source.stat()
    except OSError as exc:
        raise EngineFailed(f"GGUF file not found: {source}") from exc
    if not source.is_file():
        raise EngineFailed(f"not a GGUF file: {source}")
    key = hashlib.sha256(f"{source.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    cache = Path(cache_dir or "~/.cache/meshnode/converted").expanduser()
    target = cache / f"{source.stem}-{key.hexdigest()[:16]}"
    if (target / _MARKER).is_file():
        return str(target)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineFailed(f"cannot create the conversion cache {cache}: {exc}") from exc
    with _locked(cache / f".{target.name}.lock"):
        if (target / _MARKER).is_file():  # another process converted it while we waited
            return str(target)
        for stale in cache.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # not ours, or from a version without the marker
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        started = time.monotonic()
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the weights are not secret
            _convert(source, tmp)
            (tmp / _MARKER).write_text(json.dumps(
                {"source": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("convert.done", file=source.name, folder=str(target),
             elapsed_s=round(time.monotonic() - started, 1))
    return str(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block; the kernel drops it if we die."""
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert(source: Path, out: Path) -> None:
    try:
        import torch  # noqa: F401  (transformers needs it to load weights)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EngineFailed("converting GGUF needs transformers, torch, gguf and accelerate",
                           reason="pip install 'meshnode[transformers]'") from exc
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder, name = str(source.parent), source.name
    started = time.monotonic()
    log.info("convert.start", file=str(source), size_mb=source.stat().st_size // 2**20)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        log.info("convert.tokenizer", file=name, chat_template=bool(tokenizer.chat_template))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     **_dequantized(name))
        _drop_quantizer(model)
        log.info("convert.loaded", file=name, parameters=sum(p.numel() for p in model.parameters()),
                 dtype=str(model.dtype), elapsed_s=round(time.monotonic() - started, 1))
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except EngineFailed:
        raise
    except (ImportError, ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        raise EngineFailed(f"transformers could not convert {source}: {exc}",
                           reason=type(exc).__name__) from exc


def _dequantized(name: str) -> dict[str, Any]:
    """Ask for plain dense weights where transformers could keep GGUF blocks (>= 5.x)."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:  # older transformers always dequantize GGUF on load
        return {}
    return {"quantization_config": GgufConfig(gguf_file=name, dequantize=True)}


def _drop_quantizer(model: Any) -> None:
    """Make a dequantized model an ordinary one so `save_pretrained` writes its weights.

    transformers keeps the GGUF quantizer attached after dequantizing, and refuses to save a
    model whose quantizer is not serializable.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise EngineFailed(f"transformers kept {len(packed)} layers in GGUF blocks "
                           f"(e.g. {packed[0]}); cannot write them as safetensors")
    remove = getattr(quantizer, "remove_quantization_config", None)
    if remove is not None:
        remove(model)
        return
    for obj, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"),
                      (model, "quantization_method")):
        if hasattr(obj, attr):
            delattr(obj, attr)
    model.is_quantized = False
