"""Stored responses: one JSON file per response in <cache_dir>/responses, bounded.

A record is `{"response": <the response object>, "history": [items before this response's
input], "input": [this response's input items]}`: continuing from a response needs only that
one record (history + input + output), so evicting older ones never breaks a conversation.
Files survive restarts; the oldest (by write time) are deleted past `--responses_max`.
Owner-only: the folder is 0700 and each file 0600 whatever the umask (llmserve/private.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from llmserve.private import private_dir, write_private

logger = logging.getLogger(__name__)

_ID = re.compile(r"resp_[A-Za-z0-9]{1,100}")


class ResponseStore:
    """Responses by id on disk, in write order; at most max_items (0: store nothing)."""

    def __init__(self, directory: Path, max_items: int):
        self.directory = directory
        self.max_items = max_items
        self._order: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        if directory.is_dir():
            found = []
            for path in directory.glob("resp_*.json"):
                with contextlib.suppress(OSError):
                    found.append((path.stat().st_mtime_ns, path.name, path.stem))
            for _mtime, _name, stem in sorted(found):
                self._order[stem] = None
        with self._lock:
            self._evict()

    def __len__(self) -> int:
        return len(self._order)

    def ids(self) -> list[str]:
        """Stored ids, oldest first."""
        return list(self._order)

    def _path(self, response_id: str) -> Path | None:
        # NOTE: ids come from URLs; only our own id shape may become a file name.
        if not _ID.fullmatch(response_id):
            return None
        return self.directory / f"{response_id}.json"

    def put(self, record: dict[str, Any]) -> None:
        """Store (or replace) a record under record["response"]["id"]."""
        if self.max_items <= 0:
            return
        response_id = record["response"]["id"]
        path = self._path(response_id)
        if path is None:
            raise ValueError(f"not a response id: {response_id!r}")
        private_dir(self.directory)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_private(tmp, json.dumps(record, ensure_ascii=False).encode("utf-8"))
        os.replace(tmp, path)
        with self._lock:
            self._order[response_id] = None
            self._order.move_to_end(response_id)
            self._evict()

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The record, or None when unknown (or deleted, or unreadable)."""
        path = self._path(response_id)
        if path is None:
            return None
        try:
            record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("unreadable stored response %s: %s", path, exc)
            return None
        return record

    def delete(self, response_id: str) -> bool:
        """Remove a record; False when there was none."""
        path = self._path(response_id)
        if path is None:
            return False
        with self._lock:
            self._order.pop(response_id, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _evict(self) -> None:
        while len(self._order) > max(self.max_items, 0):
            oldest, _ = self._order.popitem(last=False)
            path = self._path(oldest)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
