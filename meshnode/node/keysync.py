"""A node's API keys at run time: file, replication, and the operations the HTTP layer calls.

Anti-entropy is sync.py's TableSync: each node gossips `KeyTable.digest()` in
NodeMeta.keys_digest; a peer whose digest differs is pulled (GET INTERNAL_KEYS_PATH: every
entry, revoked ones too, as JSON) and merged; changes are written to the data dir's key file.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import structlog

from .errors import ModelNotFound
from .keys import (
    INTERNAL_KEYS_PATH,
    ApiKey,
    CreateKeyRequest,
    KeyFileError,
    KeyStore,
    KeyTable,
    decode_keys,
    new_key,
)
from .sync import Peer, PeerVerify, TableSync

__all__ = ["NodeKeys"]

log = structlog.get_logger("meshnode.node")


class NodeKeys:
    """A node's API keys: the table, its file in the data dir, and its pull from peers.

    Owned by Node (entered in its __aenter__, closed in close()); `on_change` is called after
    any change (local write, merge from a peer, key written by the CLI into the file) so that
    the node gossips the new digest."""

    def __init__(self, data_dir: Path, origin: str, on_change: Callable[[], None], *,
                 tombstone_ttl_s: float = 3600.0, ssl_context: ssl.SSLContext | None = None,
                 verify: PeerVerify | None = None) -> None:
        self.table = KeyTable(tombstone_ttl_s)
        self._data_dir = data_dir
        self._origin = origin
        self._on_change = on_change
        self.store: KeyStore | None = None
        self.sync = TableSync(INTERNAL_KEYS_PATH, self.table.digest, self._merge, self._merged,
                              ssl_context=ssl_context, verify=verify, what="keys")

    async def __aenter__(self) -> Self:
        self.store = KeyStore(self._data_dir, self.table)
        await asyncio.to_thread(self.store.load)
        await self.sync.__aenter__()
        return self

    async def close(self) -> None:
        """Safe to call twice."""
        await self.sync.close()

    def _merge(self, data: bytes) -> list[str]:
        return [k.id for k in decode_keys(data) if self.table.merge(k)]

    def _merged(self) -> None:
        if self.store is not None:
            self.store.save()
        self._on_change()

    def check(self, peers: Iterable[Peer]) -> None:
        """Reload the file if the CLI wrote it; pull from peers whose digest differs."""
        if self.store is None:
            return
        try:
            if self.store.reload_if_changed() or self.table.purge():
                self._on_change()
        except KeyFileError as exc:
            log.warning("keys.file_damaged", error=str(exc))
        self.sync.check(peers)

    def digest(self) -> str:
        return self.table.digest()

    def create(self, req: CreateKeyRequest) -> tuple[str, ApiKey]:
        key, entry = new_key(req, self._origin)
        assert self.store is not None
        self.store.save([entry])
        self._on_change()
        log.info("keys.created", id=entry.id, role=entry.role, name=entry.name)
        return key, entry

    def revoke(self, key_id: str) -> ApiKey:
        entry = self.table.revoke(key_id, self._origin)
        if entry is None:
            raise ModelNotFound(f"no API key with id {key_id!r}: `meshnode keys list` shows "
                                "them", param="id")
        assert self.store is not None
        self.store.save()
        self._on_change()
        log.info("keys.revoked", id=key_id)
        return entry

    def views(self) -> list[dict[str, object]]:
        now = time.time()
        return [k.public(now) for k in self.table.entries()]

    def entries(self) -> bytes:
        """The whole table for a peer's pull (JSON: hashes, never secrets)."""
        return self.table.encode()

    def authenticate(self, presented: str) -> ApiKey | None:
        return self.table.authenticate(presented)
