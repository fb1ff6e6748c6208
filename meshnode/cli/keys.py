"""`meshnode keys create|list|revoke`: API keys, through a node's admin API or its data dir.

With `--data-dir DIR` the command writes the node's key file directly (no key needed, file
permissions are the guard): this is how the first admin key of a cluster is made, on the
machine of any node, running or not. A running node picks the change up within
`reconcile_interval_s` and replicates it. Without `--data-dir` it calls `--endpoint` with the
admin key in MESHNODE_API_KEY (or --api-key).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import time
import urllib.request
from typing import Any

from .client import AdminClient, CliError
from .table import table

__all__ = ["add_key_commands", "install_api_key", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdwy])")


def parse_duration(text: str) -> float | None:
    """Seconds of '90s', '15m', '1h', '30d', '2w', '1y'; None for 'never'. CliError otherwise."""
    text = text.strip().lower()
    if text in ("never", "none", "0"):
        return None
    m = _DURATION.fullmatch(text)
    if m is None or float(m.group(1)) <= 0:
        raise CliError(f"cannot read the duration {text!r}: write e.g. 90s, 15m, 1h, 30d, 1y "
                       "or never")
    return float(m.group(1)) * _UNITS[m.group(2)]


def install_api_key(key: str | None = None) -> None:
    """Send `Authorization: Bearer KEY` (KEY or MESHNODE_API_KEY) with every admin API call of
    this process (AdminClient goes through urllib's installed opener)."""
    key = key or os.environ.get("MESHNODE_API_KEY")
    if key:
        opener = urllib.request.build_opener()
        opener.addheaders = [("Authorization", f"Bearer {key.strip()}")]
        urllib.request.install_opener(opener)


def _when(ts: Any) -> str:
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _store(data_dir: str) -> Any:
    from meshnode.mesh.crypto_errors import SecurityError
    from meshnode.node import KeyStore, KeyTable, NodeError

    if not os.path.isdir(data_dir):
        raise CliError(f"no node data dir at {data_dir}: pass the --data-dir the node runs with")
    store = KeyStore(data_dir, KeyTable())
    try:
        store.load()
    except (NodeError, SecurityError) as exc:  # a damaged file, unsafe permissions: both say
        # what to do next
        raise CliError(str(exc)) from None
    return store


def _create(args: argparse.Namespace) -> int:
    import msgspec

    from meshnode.node import CreateKeyRequest, NodeError, new_key

    models = None if args.models is None else tuple(
        m.strip() for m in args.models.split(",") if m.strip())
    try:
        req = CreateKeyRequest(role=args.role, name=args.name or "", models=models,
                               expires_in_s=parse_duration(args.expires))
        req = msgspec.convert(msgspec.to_builtins(req), CreateKeyRequest)  # checks limits
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid key: {exc}") from None
    if args.data_dir:
        store = _store(args.data_dir)
        try:
            key, entry = new_key(req, origin="cli")
        except NodeError as exc:
            raise CliError(str(exc)) from None
        store.save([entry])
        view: dict[str, Any] = entry.public(time.time())
    else:
        install_api_key(args.api_key)
        view = AdminClient(args.endpoint).request("POST", "/v1/keys", msgspec.to_builtins(req))
        key = view["key"]
    print(f"created {view['role']} key {view['id']} (name: {view['name'] or '-'}; expires: "
          f"{_when(view['expires'])}; models: {','.join(view['models']) or 'all'})")
    print(key)
    print("keep it now: it is shown only once (meshnode stores a hash of it)")
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.data_dir:
        now = time.time()
        data = [k.public(now) for k in _store(args.data_dir).table.entries()]
    else:
        install_api_key(args.api_key)
        data = AdminClient(args.endpoint).request("GET", "/v1/keys")["data"]
    if not data:
        print("no API keys: `meshnode keys create --role admin --data-dir DIR` makes the first")
        return 0
    rows = [[k["id"], k["name"] or "-", k["role"], ",".join(k["models"]) or "all",
             _when(k["created"]), _when(k["expires"]), k["state"]] for k in data]
    print(table(["ID", "NAME", "ROLE", "MODELS", "CREATED", "EXPIRES", "STATE"], rows))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    if args.data_dir:
        store = _store(args.data_dir)
        entry = store.table.revoke(args.id, "cli")
        if entry is None:
            raise CliError(f"no API key with id {args.id!r}: `meshnode keys list` shows them")
        store.save()
    else:
        install_api_key(args.api_key)
        AdminClient(args.endpoint).request("DELETE", f"/v1/keys/{args.id}")
    print(f"revoked key {args.id}; every node refuses it once the change has spread "
          "(seconds)")
    return 0


def add_key_commands(sub: Any) -> None:
    """Register `keys` under the top-level subparsers `sub`."""
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def target(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", help="write the key file of the node using this data dir "
                                          "directly (how the first admin key is made)")
        q.add_argument("--endpoint", help="a node's URL (default http://127.0.0.1:7700, "
                                          "or MESHNODE_ENDPOINT)")
        q.add_argument("--api-key", help="an admin key (default: MESHNODE_API_KEY)")

    p = ksub.add_parser("create", help="make a key and print it once")
    p.add_argument("--role", choices=["admin", "user"], required=True,
                   help="admin: everything; user: inference only")
    p.add_argument("--models", metavar="M1,M2", help="deployments a user key may call "
                                                     "(default: all)")
    p.add_argument("--expires", default="never", metavar="DURATION",
                   help="lifetime, e.g. 30d, 12h, 1y, or never (default)")
    p.add_argument("--name", help="a label shown by `keys list`")
    target(p)
    p.set_defaults(func=_create)
    p = ksub.add_parser("list", help="list keys (never the keys themselves)")
    target(p)
    p.set_defaults(func=_list)
    p = ksub.add_parser("revoke", help="revoke a key on every node")
    p.add_argument("id", help="the key's id (the 12 hex digits after mnk_)")
    target(p)
    p.set_defaults(func=_revoke)
