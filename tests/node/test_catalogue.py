from pathlib import Path

import pytest

from meshnode.node import CATALOGUE, DEFAULT_MODEL, InvalidDeployment, ModelNotFound, find_spec
from meshnode.node.catalogue import ModelSource, ModelSpec, locate


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
