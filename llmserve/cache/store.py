"""Two tiers of bytes by key: RAM (LRU by bytes) and disk (diskcache, LRU by bytes).

Disk entries carry a checksum: a truncated or corrupted file (power loss, kill -9 mid-write,
a bad disk) is dropped with a warning and reads as missing. A damaged index is set aside and
replaced by a fresh one (DiskTier). diskcache's SQLite index makes
several server processes on one cache dir safe.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from contextlib import suppress
from pathlib import Path
from typing import Any

from llmserve.private import open_private, private_dir

logger = logging.getLogger(__name__)

_MAGIC = b"LLMSKV01"
_HEADER = struct.Struct("<8sQI")  # magic, payload length, crc32


def wrap(payload: bytes) -> bytes:
    """Envelope with length and checksum."""
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def unwrap(data: bytes) -> bytes | None:
    """The payload, or None when the envelope is damaged."""
    if len(data) < _HEADER.size:
        return None
    magic, length, crc = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if magic != _MAGIC or length != len(payload) or zlib.crc32(payload) != crc:
        return None
    return payload


class RamTier:
    """In-process LRU of bytes with a byte capacity; pinned keys are evicted last."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()
        self._pins: dict[str, float] = {}  # key -> time.monotonic() its pin ends

    def pin(self, keys: list[str], seconds: float) -> None:
        """Evict these keys (present or still to come) after every unpinned one, for seconds."""
        until = time.monotonic() + seconds
        with self._lock:
            for key in keys:
                self._pins[key] = max(until, self._pins.get(key, until))
            if len(self._pins) > 4 * len(self._items) + 4096:  # pins of keys never written
                now = time.monotonic()
                self._pins = {k: t for k, t in self._pins.items() if t > now}

    def pinned(self, key: str) -> bool:
        """Whether key's pin is still on."""
        return self._pins.get(key, 0.0) > time.monotonic()

    def _victim(self) -> str:
        # NOTE: a linear scan from the LRU end; the tier holds blocks of ~1 MB or more, so
        # entries number in the thousands at most.
        now = time.monotonic()
        for key in self._items:
            if self._pins.get(key, 0.0) <= now:
                self._pins.pop(key, None)
                return key
        return next(iter(self._items))  # everything is pinned: the oldest pin goes

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = value
            self.bytes += len(value)
            while self.bytes > self.capacity and self._items:
                victim = self._victim()
                self._pins.pop(victim, None)
                self.bytes -= len(self._items.pop(victim))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._pins.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(exc: BaseException) -> bool:
    """A damaged SQLite index (SQLITE_CORRUPT, SQLITE_NOTADB), as opposed to a busy one."""
    import sqlite3

    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and isinstance(code, int) and (
        code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    )


class DiskTier:
    """diskcache.Cache with checksummed values and LRU eviction by bytes.

    Self-healing: an index that cannot be opened (random bytes, `kv` a regular file, SQLite
    "malformed") is set aside as `kv.broken-<time>` with one warning and a fresh one is used;
    corruption found while serving is handled the same way, once. If no index can be opened
    at all the tier is off (every lookup a miss). Requests never fail because of the disk.
    """

    def __init__(self, directory: Path, capacity: int):
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        self._generation = 0  # bumped by each reset, so racing threads reset only once
        self._warned: set[str] = set()
        self.set_aside: list[Path] = []
        self._index: tuple[int, int] | None = None  # (device, inode) of the open cache.db
        self._cache: Any = self._open()

    # -- opening and healing ---------------------------------------------------------------

    def _connect(self) -> Any:
        import diskcache

        private_dir(self.directory)
        # NOTE: an empty file is a new SQLite database, and SQLite gives its -wal/-shm files
        # the database's mode: the index is 0600 whatever the umask (llmserve/private.py).
        with suppress(FileExistsError):
            os.close(open_private(self.directory / "cache.db",
                                  os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        cache = diskcache.Cache(
            str(self.directory),
            size_limit=self.capacity,
            eviction_policy="least-recently-used",
            cull_limit=16,
        )
        try:
            len(cache)  # NOTE: touches the index, so a malformed one fails here, not later
        except BaseException:
            cache.close()
            raise
        self._index = self._identity()
        return cache

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = (self.directory / "cache.db").stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _open(self) -> Any:
        try:
            return self._connect()
        except Exception as exc:
            if not self._set_aside(f"cannot be opened ({exc})"):
                return None
        try:
            return self._connect()
        except Exception as exc:
            logger.warning("prompt cache: disk tier off, %s cannot be opened (%s)",
                           self.directory, exc)
            return None

    def _set_aside(self, why: str) -> bool:
        """Rename the index folder (or whatever holds its name) out of the way."""
        if not (self.directory.exists() or self.directory.is_symlink()):
            logger.warning("prompt cache: disk tier off, %s %s", self.directory, why)
            return False
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.directory.with_name(f"{self.directory.name}.broken-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.directory.with_name(f"{self.directory.name}.broken-{stamp}-{n}")
        try:
            os.replace(self.directory, target)
        except OSError as exc:
            logger.warning("prompt cache: disk tier off, %s %s and cannot be moved (%s)",
                           self.directory, why, exc)
            return False
        self.set_aside.append(target)
        logger.warning("prompt cache: the index at %s %s; set aside as %s, starting a fresh one",
                       self.directory, why, target.name)
        return True

    def _failed(self, generation: int, exc: Exception) -> bool:
        """An operation raised; returns True when a fresh index now serves (retry once)."""
        if not _is_corruption(exc):
            kind = type(exc).__name__
            if kind not in self._warned:  # NOTE: one line per kind, not a traceback per request
                self._warned.add(kind)
                logger.warning("prompt cache: disk tier error, treated as a miss (%s: %s)",
                               kind, exc)
            return False
        with self._lock:
            if generation != self._generation:
                return self._cache is not None  # another thread reset it already
            self._generation += 1
            old, self._cache = self._cache, None
            with suppress(Exception):
                old.close()
            if self._identity() != self._index:
                # NOTE: another server on this cache dir already replaced the index
                logger.warning("prompt cache: the index at %s was replaced; reopening it",
                               self.directory)
                self._cache = self._open()
            elif self._set_aside(f"is corrupted ({exc})"):
                self._cache = self._open()
            return self._cache is not None

    def _call(self, default: Any, fn: Any) -> Any:
        for _ in range(2):
            cache, generation = self._cache, self._generation
            if cache is None:
                return default
            try:
                return fn(cache)
            except Exception as exc:
                if not self._failed(generation, exc):
                    return default
        return default

    # -- the tier --------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        cache, generation = self._cache, self._generation
        if cache is None:
            return None
        try:
            data = cache.get(key, default=None, read=False)
        except Exception as exc:
            if _is_corruption(exc):
                self._failed(generation, exc)
                return None
            # a damaged value file: treat as missing
            logger.warning("prompt cache: unreadable entry %s dropped (%s)", key, exc)
            self._delete(key)
            return None
        if data is None:
            return None
        payload = unwrap(bytes(data))
        if payload is None:
            logger.warning("prompt cache: corrupted entry %s dropped", key)
            self._delete(key)
        return payload

    def __contains__(self, key: str) -> bool:
        return bool(self._call(False, lambda c: key in c))

    def put(self, key: str, payload: bytes) -> None:
        data = wrap(payload)
        self._call(None, lambda c: c.set(key, data))

    def _delete(self, key: str) -> None:
        self._call(None, lambda c: c.delete(key))

    @property
    def bytes(self) -> int:
        return int(self._call(0, lambda c: c.volume()))

    def __len__(self) -> int:
        return int(self._call(0, len))

    def clear(self) -> None:
        self._call(None, lambda c: c.clear())

    def close(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            with suppress(Exception):
                cache.close()
