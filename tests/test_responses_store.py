"""The response store: bounded, oldest first, persistent, only our id shape on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from llmserve.responses.store import ResponseStore


def record(i: int) -> dict[str, Any]:
    return {"response": {"id": f"resp_{i:04d}", "output": []}, "history": [], "input": []}


def test_put_get_delete(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r", 10)
    assert store.get("resp_0001") is None
    store.put(record(1))
    assert store.get("resp_0001") == record(1)
    assert store.delete("resp_0001") is True
    assert store.delete("resp_0001") is False
    assert store.get("resp_0001") is None and len(store) == 0


def test_bounded_oldest_dropped_first(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r", 3)
    for i in range(5):
        store.put(record(i))
    assert store.ids() == ["resp_0002", "resp_0003", "resp_0004"]
    assert store.get("resp_0001") is None
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "resp_0002.json", "resp_0003.json", "resp_0004.json"]


def test_survives_restart_and_keeps_write_order(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r", 10)
    for i in (3, 1, 2):
        store.put(record(i))
    # NOTE: explicit mtimes, so the order does not depend on the clock's resolution
    for n, i in enumerate((3, 1, 2)):
        os.utime(tmp_path / "r" / f"resp_{i:04d}.json", ns=(10**9 * (n + 1),) * 2)
    again = ResponseStore(tmp_path / "r", 2)  # a smaller bound drops the oldest at start
    assert again.ids() == ["resp_0001", "resp_0002"]
    assert again.get("resp_0003") is None and again.get("resp_0002") == record(2)


@pytest.mark.parametrize("bad", ["../x", "resp_../../etc", "resp_a/b", "msg_1", "resp_", ""])
def test_foreign_ids_never_touch_the_disk(tmp_path: Path, bad: str) -> None:
    store = ResponseStore(tmp_path / "r", 10)
    (tmp_path / "x.json").write_text("{}")
    assert store.get(bad) is None
    assert store.delete(bad) is False
    assert (tmp_path / "x.json").exists()


def test_zero_stores_nothing(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r", 0)
    store.put(record(1))
    assert store.get("resp_0001") is None and not (tmp_path / "r").exists()


def test_unreadable_record_is_unknown(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r", 10)
    store.put(record(1))
    (tmp_path / "r" / "resp_0001.json").write_text("{not json")
    assert store.get("resp_0001") is None
