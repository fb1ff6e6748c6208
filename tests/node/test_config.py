from pathlib import Path

import pytest

from meshnode.node import ConfigError, NodeConfig, load_config
from meshnode.node.config import host_port


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
    ({"name": "bad/name"}, {}, None, "invalid node name 'bad/name'"),
    ({"name": "x" * 65}, {}, None, "invalid node name"),
    ({"join": ("seed:99999",)}, {}, None, "invalid --join 'seed:99999'"),
    ({}, {"MESHNODE_JOIN": "a:7701,b:port"}, None, "invalid --join 'b:port'"),
    ({}, {}, 'join = ["[::1]x"]\n', "invalid --join"),
    ({"advertise_addr": "10.0.0.1:0"}, {}, None, "invalid --advertise-addr"),
    ({"advertise_addr": "10.0.0.1", "gossip_port": 0}, {}, None, "HOST:PORT"),
])
def test_bad_settings_are_clear_errors(tmp_path: Path, flags: dict, env: dict,
                                       text: str | None, message: str) -> None:
    path = None
    if text is not None:
        path = tmp_path / "bad.toml"
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env=env, config_file=str(path) if path else None)


def test_a_bad_value_is_an_error_even_where_a_flag_overrides_it(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('http_port = "eighty"\n')
    with pytest.raises(ConfigError, match=f"in config file {f}: .*http_port"):
        load_config({"http_port": 7800}, env={}, config_file=str(f))
    with pytest.raises(ConfigError, match="in MESHNODE_\\* variables: .*grace_s"):
        load_config({"grace_s": 1.0}, env={"MESHNODE_GRACE_S": "soon"})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, env={}, config_file="/nonexistent.toml")
    with pytest.raises(ConfigError, match="cannot read config file .*: Is a directory"):
        load_config({}, env={}, config_file=str(Path(__file__).parent))


def test_seed_and_advertised_addresses() -> None:
    assert [host_port(t, 7701, "--join") for t in ("h", "h:1", "[::1]", "[fe80::1]:9")] == [
        ("h", 7701), ("h", 1), ("::1", 7701), ("fe80::1", 9)]
    config = load_config({"join": ("10.0.0.2", "box:7800"), "name": "box-1.lan"}, env={})
    assert config.join == ("10.0.0.2", "box:7800") and config.name == "box-1.lan"


def test_a_host_name_too_long_for_a_node_name_gives_its_first_label(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box." + "sub." * 20 + "lan")
    assert load_config({}, env={}).name == "gpu-box"
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop.lan")
    assert load_config({}, env={}).name == "laptop.lan"  # a valid name is kept whole


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        NodeConfig().host = "x"  # type: ignore[misc]
