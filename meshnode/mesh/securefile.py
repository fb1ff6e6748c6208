"""Files that hold keys and security state: atomic writes, owner-only permissions.

Invariants:
- A reader never sees a partial file: data goes to a temporary file in the same directory, is
  fsync'd, then linked (create) or renamed (replace) into place, and the directory is fsync'd.
- `create_private` never overwrites: two processes racing to create a key both end up reading the
  winner's file.
- `read_private` refuses a file readable or writable by group/others, owned by another user, or
  that is not a regular file (symlinks are not followed), before reading a byte of it.

POSIX only for the permission checks (on Windows they are skipped: ACLs are not modes).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from meshnode.mesh.crypto_errors import FileCorruptError, FilePermissionError

__all__ = ["create_private", "ensure_private_dir", "read_private", "read_public", "replace_file"]

_POSIX = os.name == "posix"


def ensure_private_dir(directory: str | os.PathLike[str]) -> Path:
    """Create `directory` (mode 0700) and its parents if missing; return it as a Path."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _write_temp(directory: Path, data: bytes, mode: int) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        if _POSIX:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    if not _POSIX:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_private(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Atomically create `path` holding `data` with `mode`; False (nothing written) if it exists."""
    path = Path(path)
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Atomically replace (or create) `path` with `data` and `mode`."""
    path = Path(path)
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _read(path: Path, *, private: bool, limit: int) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symlink; EACCES: not ours to read
        raise FilePermissionError(f"{path}: cannot open safely ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FilePermissionError(f"{path}: not a regular file")
        if private and _POSIX:
            if st.st_mode & 0o077:
                raise FilePermissionError(
                    f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group/others access a "
                    f"secret; run `chmod 600 {path}`"
                )
            if st.st_uid != os.geteuid():
                raise FilePermissionError(f"{path}: owned by uid {st.st_uid}, not by this user")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileCorruptError(f"{path}: larger than {limit} bytes")
    return data


def read_private(path: str | os.PathLike[str], limit: int = 1 << 20) -> bytes:
    """Read a secret file after checking it is a regular file with mode 0600 (or stricter).

    Raises FileNotFoundError if absent, FilePermissionError, or FileCorruptError if over `limit`.
    """
    return _read(Path(path), private=True, limit=limit)


def read_public(path: str | os.PathLike[str], limit: int = 1 << 20) -> bytes:
    """Read a non-secret file (a certificate); still refuses symlinks and special files."""
    return _read(Path(path), private=False, limit=limit)
