from pathlib import Path

import pytest

from meshnode.node import ConfigError, NodeConfig, load_config


def test_defaults() -> None:
    config = load_config({}, env={})
    assert (config.host, config.http_port) == ("127.0.0.1", 7700)
    assert config.name and config.data_dir.endswith("meshnode")


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "meshnode.toml"
    f.write_text('http_port = 1000\nname = "file"\nhost = "0.0.0.0"\nmodels = ["a"]\n'
                 'log-format = "json"\n')
    env = {"MESHNODE_HTTP_PORT": "2000", "MESHNODE_NAME": "env"}
    config = load_config({"http_port": 3000, "name": None}, env=env, config_file=str(f))
    assert config.http_port == 3000  # flag
    assert config.name == "env"  # env over file
    assert config.host == "0.0.0.0"  # file over default
    assert config.models == ("a",)
    assert config.log_format == "json"


def test_config_file_from_env(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("grace_s = 2.5\n")
    assert load_config({}, env={"MESHNODE_CONFIG": str(f)}).grace_s == 2.5


def test_models_from_env_are_comma_separated() -> None:
    assert load_config({}, env={"MESHNODE_MODELS": "a, b"}).models == ("a", "b")


def test_labels_from_flags_env_or_file(tmp_path: Path) -> None:
    assert load_config({}, env={"MESHNODE_LABELS": "gpu, zone=a"}).labels == ("gpu", "zone=a")
    assert load_config({"labels": ("x",)}, env={"MESHNODE_LABELS": "gpu"}).labels == ("x",)
    f = tmp_path / "c.toml"
    f.write_text('labels = ["gpu"]\n')
    assert load_config({}, env={}, config_file=str(f)).labels == ("gpu",)


@pytest.mark.parametrize(("flags", "env", "text", "message"), [
    ({"http_port": 70000}, {}, None, "http_port"),
    ({}, {"MESHNODE_HTTP_PORT": "eighty"}, None, "http_port"),
    ({}, {}, "nonsense = 1\n", "nonsense"),
    ({}, {}, "http_port = [\n", "not valid TOML"),
    ({"log_format": "xml"}, {}, None, "log_format"),
    ({"labels": ("has space",)}, {}, None, "labels"),
    ({}, {"MESHNODE_LABELS": "-dash-first"}, None, "labels"),
    ({"labels": tuple(f"l{i}" for i in range(17))}, {}, None, "labels"),
    ({"labels": tuple(f"{i}" * 60 for i in range(5))}, {}, None, "bytes of the gossiped"),
])
def test_bad_settings_are_clear_errors(tmp_path: Path, flags: dict, env: dict,
                                       text: str | None, message: str) -> None:
    path = None
    if text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env=env, config_file=str(path) if path else None)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, env={}, config_file="/nonexistent.toml")


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        NodeConfig().host = "x"  # type: ignore[misc]
