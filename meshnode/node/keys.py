"""API keys: made once, stored hashed, replicated to every node like deployments.

A key is `mnk_<id>_<secret>`: id = 12 hex digits (48 random bits, the table's key, shown in
`keys list`), secret = 43 base64url characters (256 random bits). A node stores only
SHA-256(secret). A fast hash is enough because the secret is random: guessing it means searching
2**256 values, which no key stretching would make any harder, and verification stays ~1 µs per
request. Comparison is `hmac.compare_digest`, so timing does not tell how much of a guess matched.

Replication (as DeploymentTable): every entry carries `version` (nanosecond timestamp) and
`origin`; merge keeps the larger (revoked, version, origin), so a revocation is terminal: no
write that races it can bring the key back. An entry is forgotten only `tombstone_ttl_s` after
its expiry, when nothing it says can matter any more; a revoked key without an expiry is kept.
`digest()` is gossiped in NodeMeta; a peer whose digest differs is pulled (KeySync).

Persistence: `<data_dir>/api_keys.json` (mode 0600), rewritten atomically under an exclusive
flock by the node and by `meshnode keys create --data-dir` alike; each writer merges what is on
disk first, so a key written by the CLI next to a running node is neither lost nor overwritten,
and the node picks it up when the file's (mtime, size) changes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

import msgspec
import structlog
from msgspec import Meta

from meshnode.mesh.securefile import ensure_private_dir, read_private, replace_file

from .errors import ConfigError, InvalidDeployment

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process use only
    fcntl = None  # type: ignore[assignment]

__all__ = ["INTERNAL_KEYS_PATH", "KEYS_FILE", "ApiKey", "CreateKeyRequest", "KeyFileError",
           "KeyStore", "KeyTable", "decode_keys", "hash_secret", "new_key", "parse_key"]

log = structlog.get_logger("meshnode.node")

INTERNAL_KEYS_PATH = "/internal/v1/keys"
KEYS_FILE = "api_keys.json"
KEY_PREFIX = "mnk_"
_KEY_RE = re.compile(r"mnk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{12}")
Role = Literal["admin", "user"]


class CreateKeyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/keys."""

    role: Role
    name: Annotated[str, Meta(max_length=64)] = ""
    models: tuple[Annotated[str, Meta(min_length=1, max_length=128)], ...] | None = None
    """Deployments a user key may call; None (left out) = all. An empty list is refused: it
    reads as "none", and a key must not get every model by a slip. Admin keys take none."""
    expires_in_s: Annotated[float, Meta(gt=0, le=10 * 365 * 86400)] | None = None
    """Lifetime in seconds from now; None = no expiry."""


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key as every node stores it: never the secret, only its SHA-256 (hex)."""

    id: str
    name: str
    role: Role
    models: tuple[str, ...]
    created: int
    """Unix seconds."""
    expires: int
    """Unix seconds; 0 = never."""
    secret_sha256: str
    version: int
    """Nanosecond timestamp of the last change."""
    origin: str
    """Name of the node (or `cli`) that made the last change."""
    revoked: bool = False

    def state(self, now: float) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and now >= self.expires:
            return "expired"
        return "active"

    def allows_model(self, model: str) -> bool:
        return self.role == "admin" or not self.models or model in self.models

    def public(self, now: float) -> dict[str, object]:
        """What GET /v1/keys shows (no hash)."""
        return {"id": self.id, "name": self.name, "role": self.role, "models": self.models,
                "created": self.created, "expires": self.expires or None,
                "state": self.state(now)}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    m = _KEY_RE.fullmatch(text.strip())
    return (m.group(1), m.group(2)) if m else None


def new_key(req: CreateKeyRequest, origin: str, now: float | None = None) -> tuple[str, ApiKey]:
    """(the printable key, shown once; the entry to store). InvalidDeployment for bad input."""
    if not req.name.isprintable():
        raise InvalidDeployment("key name must be printable", param="name")
    if req.models is not None and not req.models:
        raise InvalidDeployment("models names no deployment: leave it out for a key that may "
                                "call every model", param="models")
    if req.role == "admin" and req.models:
        raise InvalidDeployment("an admin key may use every model: drop --models, or make a "
                                "user key", param="models")
    now = time.time() if now is None else now
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    entry = ApiKey(id=key_id, name=req.name, role=req.role,
                   models=tuple(sorted(set(req.models or ()))),
                   created=int(now),
                   expires=int(now + req.expires_in_s) if req.expires_in_s else 0,
                   secret_sha256=hash_secret(secret), version=time.time_ns(), origin=origin)
    return f"{KEY_PREFIX}{key_id}_{secret}", entry


_decoder = msgspec.json.Decoder(list[ApiKey])


def decode_keys(data: bytes) -> list[ApiKey]:
    """Entries from a peer or the file; msgspec.DecodeError / ValidationError if malformed."""
    return _decoder.decode(data)


class KeyTable:
    """Keys by id, revoked and expired ones included; merge as the module docstring says."""

    def __init__(self, tombstone_ttl_s: float = 3600.0) -> None:
        self._items: dict[str, ApiKey] = {}
        self.tombstone_ttl_s = tombstone_ttl_s

    def get(self, key_id: str) -> ApiKey | None:
        return self._items.get(key_id)

    def entries(self) -> list[ApiKey]:
        return sorted(self._items.values(), key=lambda k: k.id)

    def __len__(self) -> int:
        return len(self._items)

    def _forgotten(self, k: ApiKey, now: float) -> bool:
        return k.expires != 0 and now - k.expires > self.tombstone_ttl_s

    def merge(self, other: ApiKey) -> bool:
        """Keep the larger (revoked, version, origin); True if ours changed."""
        if not _ID_RE.fullmatch(other.id) or self._forgotten(other, time.time()):
            return False
        mine = self._items.get(other.id)
        if mine is not None and (mine.revoked, mine.version, mine.origin) >= \
                (other.revoked, other.version, other.origin):
            return False
        self._items[other.id] = other
        return True

    def revoke(self, key_id: str, origin: str) -> ApiKey | None:
        """Mark `key_id` revoked (a newer version); None if there is no such key."""
        k = self._items.get(key_id)
        if k is None:
            return None
        if not k.revoked:
            k = msgspec.structs.replace(k, revoked=True, origin=origin,
                                        version=max(time.time_ns(), k.version + 1))
            self._items[key_id] = k
        return k

    def purge(self) -> int:
        now = time.time()
        old = [i for i, k in self._items.items() if self._forgotten(k, now)]
        for i in old:
            del self._items[i]
        return len(old)

    def authenticate(self, presented: str, now: float | None = None) -> ApiKey | None:
        """The live key `presented` names, else None (unknown, wrong secret, revoked, expired).

        The secret's hash is compared in constant time; an unknown id costs the same hash."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        k = self._items.get(key_id)
        expected = k.secret_sha256 if k is not None else "0" * 64
        if not hmac.compare_digest(hash_secret(secret), expected) or k is None:
            return None
        return k if k.state(time.time() if now is None else now) == "active" else None

    def digest(self) -> str:
        """16 hex digits over every (id, version, origin, revoked)."""
        h = hashlib.blake2b(digest_size=8, person=b"meshnode/keys")
        for k in self.entries():
            h.update(msgspec.msgpack.encode((k.id, k.version, k.origin, k.revoked)))
        return h.hexdigest()

    def encode(self) -> bytes:
        return msgspec.json.encode(self.entries())


class KeyFileError(ConfigError):
    """The key file is damaged (raised by KeyStore)."""


class KeyStore:
    """The table's file in the data dir (module docstring: locking, merging)."""

    def __init__(self, data_dir: str | os.PathLike[str], table: KeyTable) -> None:
        self.path = ensure_private_dir(data_dir) / KEYS_FILE
        self.table = table
        self._seen: tuple[int, int] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(KEYS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _merge_file(self) -> list[str]:
        try:
            data = read_private(self.path, limit=64 << 20)
        except FileNotFoundError:
            return []
        try:
            entries = decode_keys(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise KeyFileError(f"{self.path}: not a key file ({e}); move it away and "
                               "create the keys again") from None
        return [k.id for k in entries if self.table.merge(k)]

    def load(self) -> list[str]:
        """Merge the file into the table; ids that changed. KeyFileError if it is damaged."""
        with self._locked():
            changed = self._merge_file()
            self._seen = self._stat()
        return changed

    def reload_if_changed(self) -> list[str]:
        """`load()` if another process rewrote the file since we last read or wrote it."""
        return self.load() if self._stat() != self._seen else []

    def save(self, extra: Iterable[ApiKey] = ()) -> None:
        """Merge the file and `extra` into the table, then write it."""
        with self._locked():
            self._merge_file()
            for k in extra:
                self.table.merge(k)
            replace_file(self.path, self.table.encode(), 0o600)
            self._seen = self._stat()
