"""Where indexes live, and the one-writer lock that guards each of them."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import IndexLockedError, IndexStoreError

DEFAULT_INDEX = "default"
LOCK_FILE = "write.lock"


def home() -> Path:
    """The altsearch home: ``$ALTSEARCH_HOME``, else ``$XDG_DATA_HOME/altsearch`` (~/.local/share/altsearch)."""
    if os.environ.get("ALTSEARCH_HOME"):
        return Path(os.environ["ALTSEARCH_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "altsearch"


def cache_dir() -> Path:
    """Files altsearch can always rebuild: ``$ALTSEARCH_HOME/cache`` when that is set, else
    ``$XDG_CACHE_HOME/altsearch`` (~/.cache/altsearch)."""
    if os.environ.get("ALTSEARCH_HOME"):
        return home() / "cache"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "altsearch"


def index_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """A bare name (``photos``) means ``<home>/indexes/photos``; anything path-like is used as given."""
    if name_or_path is None:
        name_or_path = os.environ.get("ALTSEARCH_INDEX") or DEFAULT_INDEX
    text = os.fspath(name_or_path)
    if not text.strip():
        raise IndexStoreError("empty index name")
    if os.sep in text or text.startswith((".", "~")) or (os.altsep and os.altsep in text):
        return Path(text).expanduser().absolute()
    return home() / "indexes" / text


class WriteLock:
    """An exclusive advisory lock (``flock``) on ``<index>/write.lock`` holding the writer's pid.

    The kernel drops it when the holder exits or dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WriteLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise IndexLockedError(f"index {self.path.parent} is being updated by process {holder}; "
                                       "wait for it to finish") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
