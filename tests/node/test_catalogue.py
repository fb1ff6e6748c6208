from pathlib import Path

import pytest

from meshnode.node import CATALOGUE, DEFAULT_MODEL, InvalidDeployment, ModelNotFound, find_spec
from meshnode.node.catalogue import ModelSource, ModelSpec, context_window, locate


def test_builtin_models() -> None:
    assert DEFAULT_MODEL in CATALOGUE
    assert "chat" in CATALOGUE[DEFAULT_MODEL].abilities
    assert CATALOGUE["gemma-3-270m"].abilities == ("completion",)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct"):
        find_spec("gpt-17")


def test_local_gguf_path(tmp_path: Path) -> None:
    f = tmp_path / "My Model.Q4.gguf"
    f.write_bytes(b"GGUF")
    spec = find_spec(str(f))
    assert spec.name == "my-model.q4"
    assert locate(spec, tmp_path) == f


def test_missing_and_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="not found"):
        find_spec(str(tmp_path / "gone.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(InvalidDeployment, match="not a .gguf"):
        find_spec(str(other))
    for bad in ("/m/a\x00.gguf", "~no-such-user-zz/x.gguf", "/" + "a" * 5000 + ".gguf"):
        with pytest.raises(InvalidDeployment, match="invalid model path") as err:
            find_spec(bad)
        assert len(str(err.value)) <= 512


def test_missing_package_says_what_to_install(tmp_path: Path) -> None:
    spec = ModelSpec(name="x", family="x", abilities=("chat",), context_length=1,
                     formats=("gguf",), source=ModelSource(kind="package",
                                                           package="no_such_pkg_zz",
                                                           file="x", install="no-such-pkg"))
    with pytest.raises(ModelNotFound, match="pip install no-such-pkg"):
        locate(spec, tmp_path)


def _gguf(path: Path, **meta: str | int) -> Path:
    """A GGUF header with these key-values (str as type 8, int as uint32) and no tensors."""
    import struct

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    body = b"".join(text(k.replace("__", ".")) + (struct.pack("<I", 8) + text(v)
                                                   if isinstance(v, str)
                                                   else struct.pack("<II", 4, v))
                    for k, v in meta.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta)) + body)
    return path


def test_a_local_gguf_has_the_context_window_its_header_gives(tmp_path: Path) -> None:
    f = _gguf(tmp_path / "m.gguf", general__architecture="llama", llama__context_length=2048)
    assert find_spec(str(f)).context_length == 2048
    bare = _gguf(tmp_path / "bare.gguf", general__architecture="llama")
    assert find_spec(str(bare)).context_length == 8192  # none given: the usual default


def test_a_context_window_beyond_the_model_or_the_node_is_refused_not_cut() -> None:
    spec = CATALOGUE["gemma-3-270m"]  # 32768 tokens
    assert context_window(spec, None, 8192) == 8192  # the default: the model's, capped
    assert context_window(spec, 512, 8192) == 512
    with pytest.raises(InvalidDeployment, match="context window of 32768") as caught:
        context_window(spec, 40000, 65536)
    assert caught.value.param == "context_length"
    with pytest.raises(InvalidDeployment, match="max_context_length of 8192"):
        context_window(spec, 16384, 8192)
