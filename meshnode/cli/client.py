"""A small synchronous client for a node's admin API, used by the CLI."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

__all__ = ["AdminClient", "CliError", "DEFAULT_ENDPOINT"]

DEFAULT_ENDPOINT = "http://127.0.0.1:7700"


class CliError(Exception):
    """Printed to the user as it is, then the command exits 1."""


class AdminClient:
    def __init__(self, endpoint: str | None = None, timeout_s: float = 30.0) -> None:
        self.endpoint = (endpoint or os.environ.get("MESHNODE_ENDPOINT")
                         or DEFAULT_ENDPOINT).rstrip("/")
        self.timeout_s = timeout_s
        try:
            url = urlsplit(self.endpoint)
            url.port  # noqa: B018 (raises ValueError when out of range)
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise CliError(f"invalid endpoint {self.endpoint!r}: give a node's URL, e.g. "
                           f"{DEFAULT_ENDPOINT} (--endpoint or MESHNODE_ENDPOINT)")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise CliError(f"error {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach a node at {self.endpoint} ({reason}): is "
                           "`meshnode start` running there? Set --endpoint or "
                           "MESHNODE_ENDPOINT to reach another node.") from None
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise CliError(f"{self.endpoint} answered {method} {path} with something that is "
                           "not JSON: is it a meshnode node?") from None
