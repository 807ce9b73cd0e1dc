"""Owner-only files (llmserve/private.py): what the server writes is 0600 in 0700 folders,
whatever the umask, and older files under the cache dir are tightened at start."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmserve.cache.store import DiskTier
from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from llmserve.http.app import create_app
from llmserve.private import private_dir, tighten, write_private
from llmserve.responses.store import ResponseStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_store_files_are_private_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    store = ResponseStore(tmp_path / "a" / "responses", 10)
    store.put({"response": {"id": "resp_1", "output": []}, "history": [], "input": []})
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "responses") == 0o700
    assert mode(tmp_path / "a" / "responses" / "resp_1.json") == 0o600


def test_disk_tier_index_is_private(tmp_path: Path, loose_umask: None) -> None:
    disk = DiskTier(tmp_path / "kv", 1 << 20)
    try:
        disk.put("k" * 16, b"v" * 100_000)  # big enough for a value file
    finally:
        disk.close()
    assert mode(tmp_path / "kv") == 0o700
    assert mode(tmp_path / "kv" / "cache.db") == 0o600


def test_helpers(tmp_path: Path, loose_umask: None) -> None:
    private_dir(tmp_path / "x" / "y")
    write_private(tmp_path / "x" / "y" / "f", b"data")
    old = tmp_path / "old"
    old.write_bytes(b"")
    os.chmod(old, 0o644)
    write_private(old, b"now private")
    assert mode(tmp_path / "x") == mode(tmp_path / "x" / "y") == 0o700
    assert mode(tmp_path / "x" / "y" / "f") == mode(old) == 0o600
    assert tighten(tmp_path / "missing") == 0


def test_start_tightens_older_files_in_one_line(
    tmp_path: Path, fake_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    (cache / "responses").mkdir(parents=True)
    os.chmod(cache, 0o755)
    os.chmod(cache / "responses", 0o755)
    old = cache / "responses" / "resp_old.json"
    old.write_text("{}")
    os.chmod(old, 0o644)
    tool = cache / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o755)
    outside = tmp_path / "outside"
    outside.write_text("")
    os.chmod(outside, 0o644)
    (cache / "link").symlink_to(outside)  # not followed, not changed
    settings = Settings(model_name="alpha.gguf", models_dir=fake_models_dir, cache_dir=cache,
                        no_announce=True)
    with caplog.at_level(logging.INFO, logger="llmserve.http.app"):
        create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    assert mode(cache) == mode(cache / "responses") == 0o700
    assert mode(old) == 0o600 and mode(tool) == 0o700
    assert mode(outside) == 0o644
    lines = [r.getMessage() for r in caplog.records if "owner-only" in r.getMessage()]
    assert lines == [f"made 4 files and folders under {cache} owner-only (chmod go-rwx)"]
    # NOTE: the server process keeps umask 0o077 from here on
    assert os.umask(0o077) == 0o077
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmserve.http.app"):
        create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    assert not [r for r in caplog.records if "owner-only" in r.getMessage()]
