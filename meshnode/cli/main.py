"""`meshnode` command line: start a node, and manage deployments on a running one."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from meshnode import __version__

from .client import AdminClient, CliError
from .join import add_invite_command
from .keys import add_key_commands, install_api_key
from .security import add_security_commands
from .table import table

__all__ = ["main"]


def _start(args: argparse.Namespace) -> int:
    from meshnode.http import serve
    from meshnode.node import ConfigError, NodeError, load_config

    from .logs import configure_logging

    flags = {"host": args.host, "http_port": args.http_port, "name": args.name,
             "data_dir": args.data_dir, "models": tuple(args.model or ()),
             "log_format": args.log_format, "log_level": args.log_level, "grace_s": args.grace,
             "drain_s": args.drain, "bind": args.bind, "gossip_port": args.gossip_port,
             "advertise_addr": args.advertise_addr, "join": tuple(args.join or ()),
             "mdns": False if args.no_mdns else None, "interface": args.interface,
             "cluster": args.cluster, "mesh_preset": args.mesh_preset,
             "ca_cert": args.ca, "cert": args.cert, "key": args.key,
             "insecure": True if args.insecure else None, "internal_port": args.internal_port}
    flags.update({"api_keys": args.api_keys, "ca_dir": args.ca_dir,
                  "invite_port": args.invite_port})
    flags["prompt_cache_mb"] = args.prompt_cache_mb
    flags["labels"] = tuple(args.label or ())
    try:
        config = load_config(flags, config_file=args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    configure_logging(config.log_format, config.log_level)
    if args.token:  # join a signed cluster first: its CA and our certificate land in data_dir
        import msgspec

        from .join import redeem_token
        ca_cert, cert = redeem_token(args.token, config.data_dir, config.name)
        config = msgspec.structs.replace(config, ca_cert=ca_cert, cert=cert)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(config))
    except ConfigError as exc:  # the cluster identity, or an open node bound off loopback
        raise CliError(str(exc)) from None
    except NodeError as exc:  # a --model that cannot be launched
        raise CliError(f"cannot start the node: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot start the node: {exc}. Is another node using port "
                       f"{config.http_port}? Choose another with --http-port.") from None
    return 0


def _model_arg(model: str) -> str:
    """A catalogue name as it is; a path made absolute from the caller's directory and home
    (the node's own mean nothing to the user)."""
    if model.endswith(".gguf") or "/" in model:
        return str(Path(model).expanduser().absolute())
    return model


def _launch(args: argparse.Namespace) -> int:
    client = AdminClient(args.endpoint)
    body: dict[str, object] = {"model": _model_arg(args.model), "replicas": args.replicas}
    if args.name:
        body["name"] = args.name
    if args.engine:
        body["engine"] = args.engine
    if args.chat_template:
        try:
            body["chat_template"] = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CliError(f"cannot read the chat template {args.chat_template}: {why}") \
                from None
        if not body["chat_template"].strip():
            raise CliError(f"the chat template {args.chat_template} is empty")
    if args.node:
        body["nodes"] = args.node
    if args.label:
        body["labels"] = args.label
    if args.min_ram_mb:
        body["min_ram_mb"] = args.min_ram_mb
    if args.context_length is not None:
        body["context_length"] = args.context_length
    if args.engine_args:
        body["engine_args"] = args.engine_args
    view = client.request("POST", "/v1/deployments", body)
    name = view["name"]
    if args.no_wait:
        print(f"launched {name} ({view['status']})")
        return 0
    return _wait(client, name, args.timeout)


def _wait(client: AdminClient, name: str, timeout_s: float) -> int:
    spinner = "|/-\\"
    start = time.monotonic()
    tty = sys.stdout.isatty()
    i = 0
    while True:
        view = client.request("GET", f"/v1/deployments/{name}")
        status = view["status"]
        states = ", ".join(f"{p['node']}: {p['state']}" for p in view["placed"]) or "unplaced"
        elapsed = time.monotonic() - start
        line = f"{spinner[i % 4]} {name}: {status} ({states}) {elapsed:5.1f}s"
        if tty:
            print("\r" + line.ljust(78), end="", flush=True)
        elif i % 10 == 0:
            print(line, flush=True)
        if status in ("ready", "partial"):
            print(f"\r{name} is {status} after {elapsed:.1f}s".ljust(78 if tty else 0))
            if view["message"]:
                print(f"note: {view['message']}")
            return 0
        if status == "failed":
            print()
            raise CliError(f"{name} failed to load: {view['message']}")
        if status == "unplaced":
            print()
            raise CliError(f"{name} is launched but no node can hold it: {view['message']}. "
                           f"It starts when a node can; `meshnode stop {name}` removes it")
        if elapsed > timeout_s:
            print()
            raise CliError(f"{name} is still {status} after {timeout_s:.0f}s; "
                           f"`meshnode ps` shows its progress")
        i += 1
        time.sleep(0.2)


def _ps(args: argparse.Namespace) -> int:
    data = AdminClient(args.endpoint).request("GET", "/v1/deployments")["data"]
    if not data:
        print("no deployments: `meshnode launch MODEL` starts one")
        return 0
    rows = []
    for d in data:
        where = ", ".join(f"{p['node']}({p['state']})" for p in d["placed"]) or "-"
        ready = sum(p["state"] == "ready" for p in d["placed"])
        rows.append([d["name"], d["model"], d["engine"], f"{ready}/{d['replicas']}",
                     d["status"], where, _rules(d) or "-", d["message"] or ""])
    print(table(["NAME", "MODEL", "ENGINE", "READY", "STATUS", "REPLICAS", "ON", "MESSAGE"],
                rows))
    return 0


def _stop(args: argparse.Namespace) -> int:
    AdminClient(args.endpoint).request("DELETE", f"/v1/deployments/{args.name}")
    print(f"stopped {args.name}")
    return 0


def _scale(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise CliError("replicas must be at least 1; to remove a deployment use "
                       f"`meshnode stop {args.name}`")
    client = AdminClient(args.endpoint)
    view = client.request("PATCH", f"/v1/deployments/{args.name}", {"replicas": args.replicas})
    print(f"{args.name}: {view['replicas']} replica(s) wanted; placement follows "
          "(`meshnode ps` shows where they run)")
    return 0


def _update(args: argparse.Namespace) -> int:
    body: dict[str, object] = {}
    if args.replicas is not None:
        body["replicas"] = args.replicas
    if args.node or args.any_node:
        body["nodes"] = args.node or []
    if args.label or args.no_labels:
        body["labels"] = args.label or []
    if args.min_ram_mb is not None:
        body["min_ram_mb"] = args.min_ram_mb
    if not body:
        raise CliError("nothing to change: give --replicas, --node, --any-node, --label, "
                       "--no-labels or --min-ram-mb")
    view = AdminClient(args.endpoint).request("PATCH", f"/v1/deployments/{args.name}", body)
    print(f"{view['name']}: {view['replicas']} replica(s) on {_rules(view) or 'any node'}; "
          f"now {view['status']}" + (f": {view['message']}" if view["message"] else "")
          + " (`meshnode ps` shows where they run)")
    return 0


def _memory(member: dict[str, Any]) -> str:
    """A member's RAM and GPUs, as placement budgets them: "64G ram, 2x80G gpu"."""
    ram, gpus = member.get("ram_mb", 0), member.get("gpu_mb", [])
    parts = [f"{ram / 1024:.0f}G ram"] if ram else []
    for mb in sorted(set(gpus), reverse=True):
        parts.append(f"{gpus.count(mb)}x{mb / 1024:.0f}G gpu")
    return ", ".join(parts) or "-"


def _rules(view: dict[str, Any]) -> str:
    """A deployment's placement constraints, as ps shows them ("" when none)."""
    rules = [*(f"node={n}" for n in view.get("nodes", ())),
             *(f"label={x}" for x in view.get("labels", ()))]
    if view.get("min_ram_mb"):
        rules.append(f"ram>={view['min_ram_mb']}MB")
    return " ".join(rules)


def _catalogue(args: argparse.Namespace) -> int:
    data = AdminClient(args.endpoint).request("GET", "/v1/catalogue")["data"]
    rows = [[m["name"], ",".join(m["abilities"]), m["context_length"], ",".join(m["formats"]),
             f"{m['size_mb']} MB", m["description"]] for m in data]
    print(table(["NAME", "ABILITIES", "CONTEXT", "FORMATS", "SIZE", "DESCRIPTION"], rows))
    return 0


def _members(args: argparse.Namespace) -> int:
    data = AdminClient(args.endpoint).request("GET", "/v1/cluster/nodes")["data"]
    rows = [[m["name"] + (" *" if m["local"] else ""), m["node_id"][:12], m["address"],
             m["state"] + (", stopping" if m.get("draining") else "")
             + ("" if m.get("reachable", True) else ", unreachable from here"),
             m["incarnation"], ", ".join(m["models"]) or "-", m["load"],
             _memory(m), ", ".join(m.get("labels", ())) or "-", f"{m['since_s']:.0f}s ago"]
            for m in data]
    print(table(["NAME", "NODE ID", "ADDRESS", "STATE", "INC", "MODELS", "LOAD", "MEMORY",
                 "LABELS", "SINCE"], rows))
    return 0


def _engines(args: argparse.Namespace) -> int:
    from urllib.parse import quote
    data = AdminClient(args.endpoint).request(
        "GET", f"/v1/engines?model={quote(_model_arg(args.model))}")["data"]
    rows = [[r["node"], r["engine"] or "-", "yes" if r["available"] else "no",
             "*" if r["default"] else "", r["reason"]] for r in data]
    print(table(["NODE", "ENGINE", "CAN RUN", "DEFAULT", "WHY NOT"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode", description=(
        "A peer-to-peer model-serving mesh with one OpenAI-compatible endpoint."))
    parser.add_argument("--version", action="version", version=f"meshnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("start", help="run a node")
    p.add_argument("--host", help="address the HTTP API binds (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP API port (default 7700)")
    p.add_argument("--name", help="this node's name (default: the host name)")
    p.add_argument("--data-dir", help="models, logs and state (default ~/.local/share/meshnode)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="launch this model at start (repeatable); a catalogue name or a .gguf path")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="time in-flight requests get to finish on shutdown (default 10)")
    p.add_argument("--drain", type=float, metavar="SECONDS",
                   help="on shutdown, serve this node's replicas until they are ready on other "
                        "nodes, at most this long (default 60; 0: stop at once)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (or MESHNODE_CONFIG)")
    p.add_argument("--bind", help="address the gossip port binds (default: --host)")
    p.add_argument("--gossip-port", type=int, help="UDP+TCP membership port (default 7701)")
    p.add_argument("--advertise-addr", metavar="HOST[:PORT]",
                   help="gossip address other nodes should use (default: the bound one)")
    p.add_argument("--join", action="append", metavar="HOST:PORT",
                   help="a seed node's gossip address (repeatable), where mDNS does not reach")
    p.add_argument("--no-mdns", action="store_true", help="no mDNS announce/discovery")
    p.add_argument("--interface", metavar="IP", help="interface address mDNS runs on")
    p.add_argument("--cluster", help="open cluster name (default meshnode)")
    p.add_argument("--mesh-preset", choices=["lan", "local"],
                   help="membership timings: lan (memberlist defaults) or local (tests)")
    p.add_argument("--ca", metavar="CA.pem",
                   help="cluster CA certificate: join only this signed cluster (with --cert)")
    p.add_argument("--cert", metavar="NODE.crt", help="this node's certificate, signed by --ca")
    p.add_argument("--key", metavar="KEY.pem",
                   help="this node's private key (default: the key in the data dir)")
    p.add_argument("--insecure", action="store_true",
                   help="allow an open node (no --ca) on a non-loopback address")
    p.add_argument("--internal-port", type=int,
                   help="node-to-node mTLS port of a signed node (default 7702)")
    p.add_argument("--token", help="an invite token (`meshnode invite`): get this node's "
                                   "certificate with it, then start as a signed node")
    p.add_argument("--api-keys", choices=["auto", "required", "off"],
                   help="API keys: auto (required with --ca or off loopback), required, off")
    p.add_argument("--ca-dir", help="the cluster CA this node holds: serve invite redemption "
                                    "(passphrase from MESHNODE_CA_PASSPHRASE)")
    p.add_argument("--invite-port", type=int, help="TLS port of invite redemption (default "
                                                   "7703)")
    p.add_argument("--prompt-cache-mb", type=int, metavar="MIB",
                   help="saved KV states per llama.cpp replica, in MiB (default 256; 0 = off)")
    p.add_argument("--label", action="append", metavar="LABEL",
                   help="a label of this node (repeatable), e.g. gpu or zone=a: deployments "
                        "launched with --label run only on nodes that carry it")
    p.set_defaults(func=_start)

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        q.add_argument("--endpoint", help="a node's URL (default http://127.0.0.1:7700, "
                                          "or MESHNODE_ENDPOINT)")
        return q

    p = client_parser("launch", "launch a model on the mesh and wait until it is ready")
    p.usage = "meshnode launch [options] MODEL [-- ENGINE_ARG ...]"
    p.epilog = ("Everything after -- is added to the vllm or sglang server's command line: "
                "meshnode launch MODEL --engine vllm -- --max-num-seqs 8 --dtype float16")
    p.add_argument("model", help="a catalogue name (see `meshnode catalogue`) or a .gguf path")
    p.add_argument("--name", help="deployment name requests will use (default: the model name)")
    p.add_argument("--engine", help="force an engine: llama.cpp, transformers, vllm, sglang, mlx")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="replicas to place, on different nodes (default 1)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use")
    p.add_argument("--context-length", type=int, metavar="TOKENS",
                   help="context window (default: the model's, at most the node's "
                        "max_context_length)")
    p.add_argument("--node", action="append", metavar="NAME",
                   help="run replicas only on this node (repeatable: any of these nodes)")
    p.add_argument("--label", action="append", metavar="LABEL",
                   help="run replicas only on nodes started with this label (repeatable: "
                        "every one of them)")
    p.add_argument("--min-ram-mb", type=int, metavar="MB",
                   help="run replicas only on nodes with at least this much RAM")
    p.add_argument("--no-wait", action="store_true", help="return once launched")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="how long to wait for a ready replica (default 900); the "
                   "deployment stays launched after it")
    p.set_defaults(func=_launch)

    p = client_parser("ps", "list deployments and where their replicas run")
    p.set_defaults(func=_ps)
    p = client_parser("stop", "stop a deployment")
    p.add_argument("name")
    p.set_defaults(func=_stop)
    p = client_parser("scale", "change how many replicas a deployment has")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    p.set_defaults(func=_scale)
    p = client_parser("update", "change a deployment's replicas or where it may run")
    p.add_argument("name")
    p.add_argument("--replicas", type=int, metavar="N")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--node", action="append", metavar="NAME",
                     help="run replicas only on this node (repeatable); replaces the pin")
    pin.add_argument("--any-node", action="store_true", help="drop the node pin")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--label", action="append", metavar="LABEL",
                        help="run replicas only on nodes with this label (repeatable); "
                             "replaces the labels")
    labels.add_argument("--no-labels", action="store_true", help="drop the label constraint")
    p.add_argument("--min-ram-mb", type=int, metavar="MB", help="0 drops the minimum")
    p.set_defaults(func=_update)
    p = client_parser("members", "list the nodes of the mesh as this node sees them")
    p.set_defaults(func=_members)
    p = client_parser("engines", "which engines could run a model on each live node, and why not")
    p.add_argument("model")
    p.set_defaults(func=_engines)
    p = client_parser("catalogue", "list the models this node knows")
    p.set_defaults(func=_catalogue)
    add_security_commands(sub)
    add_invite_command(sub)
    add_key_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    engine_args: list[str] = []
    if argv[:1] == ["launch"] and "--" in argv:  # the engine's own arguments, taken verbatim
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.engine_args = engine_args
    install_api_key()  # MESHNODE_API_KEY, for every command that calls a node
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
