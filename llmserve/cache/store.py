"""Two tiers of bytes by key: RAM (LRU by bytes) and disk (diskcache, LRU by bytes).

Disk entries carry a checksum: a truncated or corrupted file (power loss, kill -9 mid-write,
a bad disk) is dropped with a warning and reads as missing. diskcache's SQLite index makes
several server processes on one cache dir safe.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


class DiskTier:
    """diskcache.Cache with checksummed values and LRU eviction by bytes."""

    def __init__(self, directory: Path, capacity: int):
        import diskcache

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._cache: Any = diskcache.Cache(
            str(directory),
            size_limit=capacity,
            eviction_policy="least-recently-used",
            cull_limit=16,
        )

    def get(self, key: str) -> bytes | None:
        try:
            data = self._cache.get(key, default=None, read=False)
        except Exception as exc:  # a damaged file or index row: treat as missing
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
        return key in self._cache

    def put(self, key: str, payload: bytes) -> None:
        self._cache.set(key, wrap(payload))

    def _delete(self, key: str) -> None:
        try:
            self._cache.delete(key)
        except Exception:
            logger.exception("prompt cache: could not delete %s", key)

    @property
    def bytes(self) -> int:
        return int(self._cache.volume())

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.close()
