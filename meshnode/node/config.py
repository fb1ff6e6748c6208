"""The node's configuration: one frozen object, from defaults < TOML file < MESHNODE_* < flags.

Every field is documented with what it does, its unit and its trade-off. Durations are float
seconds named `*_s`. Tests build a `NodeConfig(...)` directly; they never patch constants.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError

__all__ = ["NodeConfig", "load_config", "default_data_dir", "host_port"]

Port = Annotated[int, Meta(ge=0, le=65535)]
LABELS_MAX_BYTES = 256
"""Bytes all of a node's labels may take (each + 1) of its 1 KB gossiped metadata."""
Label = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._=:-]{0,63}$")]
"""A node label: `gpu`, `zone=a`: a letter or digit, then up to 63 of those or . _ = : -"""
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
NodeName = Annotated[str, Meta(pattern=NAME_PATTERN)]
"""A node's name (`--name`), what a deployment is pinned to: 1-64 letters, digits, . _ -"""
ENV_PREFIX = "MESHNODE_"
DEFAULT_GOSSIP_PORT = 7701


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(base, "meshnode")


class NodeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    """Address the HTTP API binds. Loopback by default: nothing is exposed until asked."""
    http_port: Port = 7700
    """TCP port of the OpenAI and admin API; 0 picks a free port (tests)."""
    name: str = ""
    """Human name of this node in tables and logs; empty means the host name."""
    data_dir: str = ""
    """Where models, logs and state live; empty means $XDG_DATA_HOME/meshnode."""
    models: tuple[str, ...] = ()
    """Models (catalogue names or GGUF paths) to launch when the node starts."""
    labels: Annotated[tuple[Label, ...], Meta(max_length=16)] = ()
    """Labels of this node (`gpu`, `zone=a`), gossiped: a deployment launched with
    `--label L` runs only on nodes that carry L. At most 16, in LABELS_MAX_BYTES."""
    log_format: Literal["console", "json"] = "console"
    """console for people, json (one object a line) for log collectors."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""
    drain_s: Annotated[float, Meta(ge=0)] = 60.0
    """On SIGINT/SIGTERM, how long the node waits for its replicas to be ready on other nodes
    (placement moves them there) before it stops serving them; 0: stop at once. A second
    signal cuts the wait short."""
    grace_s: Annotated[float, Meta(ge=0)] = 10.0
    """On SIGINT/SIGTERM, how long in-flight requests get to finish before they are cancelled;
    also how long a replica that moved to another node finishes the requests it was serving."""
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    """Largest request body accepted (413 above): bounds memory per request."""
    engine_threads: Annotated[int, Meta(ge=0)] = 0
    """CPU threads per llama.cpp engine; 0 = all cores. More replicas on one box want fewer."""
    max_context_length: Annotated[int, Meta(ge=128)] = 8192
    """Cap on a model's context window (tokens): the KV cache grows linearly with it."""
    engine_start_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    """Longest an engine may take to load before its start counts as failed."""
    bind: str = ""
    """Address the gossip sockets (UDP and TCP) bind; empty = `host`."""
    gossip_port: Port = DEFAULT_GOSSIP_PORT
    """UDP and TCP port of the membership protocol; 0 picks a free port (tests)."""
    advertise_addr: str = ""
    """HOST[:PORT] other nodes use to reach our gossip port (behind NAT, or when binding
    0.0.0.0); empty = the bound address. A loopback address is never advertised off-host."""
    join: tuple[str, ...] = ()
    """Seeds HOST:PORT to join (for networks without multicast); retried while we are alone."""
    mdns: bool = True
    """Announce and discover by mDNS on the bound interface (never on loopback)."""
    interface: str = ""
    """Address of the interface mDNS runs on; empty = the gossip address."""
    cluster: str = "meshnode"
    """Name of an open cluster; nodes of other clusters ignore each other's packets."""
    mesh_preset: Literal["lan", "local"] = "lan"
    """Timing preset of the membership protocol: lan (memberlist defaults) or local (tests)."""
    tombstone_ttl_s: Annotated[float, Meta(gt=0)] = 3600.0
    """How long a stopped deployment's tombstone is kept and replicated. A node away longer
    than this can bring the stopped deployment back; longer costs a few bytes per stop."""
    reconcile_interval_s: Annotated[float, Meta(gt=0)] = 0.5
    """How often placement and deployment sync are checked besides membership events: the
    delay before a node starts a replica it was given, or pulls a table whose digest moved."""
    ca_cert: str = ""
    """PEM file of the cluster CA certificate. With `cert`, the node joins only that signed
    cluster: every node-to-node path is authenticated (mTLS, sealed gossip), and clients need
    API keys. Empty = an open cluster (allowed on loopback, or anywhere with `insecure`)."""
    cert: str = ""
    """PEM file of this node's certificate, signed by `ca_cert` for this node's key."""
    key: str = ""
    """PEM file of this node's private key; empty = the identity key in the data dir."""
    insecure: bool = False
    """Allow an open cluster (no CA, no API keys) on a non-loopback address. Anyone who can
    reach the ports can then join, read gossip and use the API."""
    internal_port: Port = 7702
    """TCP port of the node-to-node listener (mTLS) of a signed cluster: forwarded requests and
    table sync; 0 picks a free port (tests). Unused by an open cluster."""
    api_keys: Literal["auto", "required", "off"] = "auto"
    """Whether API clients need a key (Bearer). auto: required when the node has a cluster
    identity (`ca_cert`) or binds a non-loopback `host` without `insecure`; open otherwise.
    required: always (tests, or a loopback node shared by several users). off: never (only
    sensible behind another gateway). `/health` is always open."""
    ca_dir: str = ""
    """Directory of the cluster CA (`meshnode ca init`) on the node that holds it; empty =
    `<data_dir>/ca` if present. Such a node serves invite redemption on `invite_port`
    (passphrase from MESHNODE_CA_PASSPHRASE or MESHNODE_CA_PASSPHRASE_FILE)."""
    invite_port: Port = 7703
    """TCP port (TLS) where the CA holder redeems invite tokens; 0 picks a free port (tests)."""
    engine_pythons: dict[str, str] = {}
    """Per-engine interpreter of its own venv, e.g. {"vllm": "/opt/vllm/bin/python"}; engines
    pin conflicting versions. Unlisted engines use the node's own interpreter."""
    prompt_cache_mb: Annotated[int, Meta(ge=0)] = 256
    """MiB of saved KV states per llama.cpp replica (multi-prefix prompt cache): prompts that
    share a prefix with a recent request skip re-evaluating it. 0 disables it. RAM per replica;
    SmolLM2-135M takes ~22 KiB a token, so 256 MiB keeps ~11,000 tokens of prefixes."""

    def resolved(self) -> "NodeConfig":
        """Fill the defaults that depend on the machine (name, data_dir). ConfigError when
        the labels would crowd the 1 KB of gossiped node metadata."""
        if sum(len(label) + 1 for label in self.labels) > LABELS_MAX_BYTES:
            raise ConfigError(f"labels {', '.join(self.labels)} take more than "
                              f"{LABELS_MAX_BYTES} bytes of the gossiped node metadata: use "
                              "fewer or shorter ones")
        for seed in self.join:
            host_port(seed, DEFAULT_GOSSIP_PORT, "--join")
        if self.advertise_addr:
            host_port(self.advertise_addr, self.gossip_port, "--advertise-addr")
        name = self.name
        if not name:  # the host name; its first label where the whole is too long
            name = socket.gethostname()
            if not re.fullmatch(NAME_PATTERN, name):
                name = name.split(".")[0]
        if not re.fullmatch(NAME_PATTERN, name):
            raise ConfigError(f"invalid node name {name!r}: use 1-64 letters, digits, '.', "
                              "'_' or '-' (--name NAME)")
        return msgspec.structs.replace(
            self,
            name=name,
            data_dir=os.path.abspath(os.path.expanduser(self.data_dir or default_data_dir())),
        )


def host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """(host, port) of `HOST`, `HOST:PORT` or `[IPV6]:PORT`, the port 1-65535; ConfigError
    naming the setting `what` otherwise."""
    host, port = text, str(default_port)
    if text.startswith("["):  # [v6] or [v6]:port
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                host = ""
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"invalid {what} {text!r}: give HOST or HOST:PORT, the port "
                          "1-65535")
    return host, int(port)


_FIELDS = {f.name: f for f in msgspec.structs.fields(NodeConfig)}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is None:
            continue
        items = [v.strip() for v in value.split(",") if v.strip()]
        if name in ("models", "join", "labels"):
            out[name] = tuple(items)
        elif name == "engine_pythons":  # "vllm=/opt/vllm/bin/python,sglang=..."
            out[name] = dict(item.split("=", 1) for item in items if "=" in item)
        else:
            out[name] = value
    return out


def load_config(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config_file: str | None = None) -> NodeConfig:
    """Merge defaults < TOML file < environment < flags (None flags are unset) and check it."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                merged.update(tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        merged = {k.replace("-", "_"): v for k, v in merged.items()}
        _check(merged, f"config file {path}")  # a bad value is an error even if overridden
    from_env = _from_env(env)
    _check(from_env, f"{ENV_PREFIX}* variables")
    merged.update(from_env)
    merged.update({k: v for k, v in (flags or {}).items() if v is not None and v != ()})
    try:
        config = msgspec.convert(merged, NodeConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    return config.resolved()


def _check(values: dict[str, Any], source: str) -> None:
    """ConfigError naming `source` if its own values do not make a NodeConfig."""
    try:
        msgspec.convert(values, NodeConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None
