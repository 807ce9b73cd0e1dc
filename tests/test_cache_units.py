"""Prefix keys, tiers and the KV-state splitter on synthetic data (no model)."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from llmserve.cache import kvstate
from llmserve.cache.prefix import block_keys, tail_key
from llmserve.cache.store import DiskTier, RamTier, unwrap, wrap


def test_block_keys_chain_whole_prefix() -> None:
    a = list(range(100))
    b = [*range(50), 999, *range(51, 100)]
    ka, kb = block_keys("fp", a, 16), block_keys("fp", b, 16)
    assert len(ka) == 6  # only full blocks
    assert ka[:3] == kb[:3]  # blocks before the change are shared
    assert all(x != y for x, y in zip(ka[3:], kb[3:], strict=True))  # every later key differs
    assert block_keys("other-model", a, 16)[0] != ka[0]
    assert tail_key(ka[0], [1, 2]) != tail_key(ka[0], [1, 3])


def test_envelope_detects_damage() -> None:
    data = wrap(b"payload" * 100)
    assert unwrap(data) == b"payload" * 100
    assert unwrap(data[:-1]) is None
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    assert unwrap(bytes(flipped)) is None
    assert unwrap(b"") is None


def test_ram_tier_lru_by_bytes() -> None:
    ram = RamTier(capacity=250)
    for key in "abc":
        ram.put(key, b"x" * 100)
    assert "a" not in ram and "b" in ram and "c" in ram
    assert ram.get("b") is not None  # b is now most recent
    ram.put("d", b"x" * 100)
    assert "c" not in ram and "b" in ram
    assert ram.bytes == 200
    ram.put("huge", b"x" * 1000)  # larger than the whole tier: not stored
    assert "huge" not in ram


def test_disk_tier_drops_corrupted_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskTier(tmp_path / "kv", capacity=1 << 30)
    disk.put("k", b"v" * 100_000)  # large enough to live in its own file
    assert disk.get("k") == b"v" * 100_000
    files = list((tmp_path / "kv").rglob("*.val"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:5000])  # truncated, as after a crash mid-write
    with caplog.at_level(logging.WARNING):
        assert disk.get("k") is None
    assert "k" not in disk
    assert "dropped" in caplog.text
    disk.close()


def _set_aside_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]


@pytest.mark.parametrize("damage", ["random", "file"])
def test_unopenable_index_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    kv = tmp_path / "kv"
    disk = DiskTier(kv, capacity=1 << 30)
    disk.put("k", b"v" * 10)
    disk.close()
    if damage == "random":
        (kv / "cache.db").write_bytes(np.random.default_rng(0).bytes(100_000))
    else:
        for f in sorted(kv.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        kv.rmdir()
        kv.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        disk = DiskTier(kv, capacity=1 << 30)
        assert disk.get("k") is None and len(disk) == 0
        disk.put("k2", b"fresh")
        assert disk.get("k2") == b"fresh"
    assert len(_set_aside_warnings(caplog)) == 1
    assert len(disk.set_aside) == 1 and disk.set_aside[0].exists() and kv.is_dir()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    disk.close()


def test_index_corrupted_while_open_is_replaced_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kv = tmp_path / "kv"
    disk = DiskTier(kv, capacity=1 << 30)
    for i in range(60):
        disk.put(f"k{i}", bytes([i]) * 40_000)
    for name in ("cache.db", "cache.db-wal"):  # the header survives, the pages after it do not
        db = kv / name
        if db.exists() and db.stat().st_size > 100:
            with db.open("r+b") as f:
                f.seek(100)
                f.write(np.random.default_rng(1).bytes(db.stat().st_size - 100))
    with caplog.at_level(logging.WARNING):
        for i in range(60, 70):  # every operation keeps working; the first failing one heals
            assert f"k{i}" not in disk
            disk.put(f"k{i}", b"x" * 10)
            assert disk.get(f"k{i}") == b"x" * 10
            assert len(disk) >= 0 and disk.bytes > 0
        disk.put("after", b"y")
        assert "after" in disk and len(disk) >= 1 and "k0" not in disk
    assert len(_set_aside_warnings(caplog)) == 1 and len(disk.set_aside) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    disk.close()


def _fake_state(n_cells: int, *, v_trans: bool, n_layer: int = 3, shuffle: bool = False) -> bytes:
    """A blob in llama.cpp's sequence-state layout, values derived from the cell position."""
    pos = np.arange(n_cells, dtype=np.int32)
    if shuffle:
        pos = pos[::-1].copy()
    meta = np.zeros((n_cells, 3), np.int32)
    meta[:, 0] = pos
    meta[:, 1] = 1
    parts = [struct.pack("<IiII", kvstate.MAGIC, 0, 1, n_cells), meta.tobytes()]
    parts.append(struct.pack("<II", int(v_trans), n_layer))
    k_row, n_embd = 8, 4
    for layer in range(n_layer):
        rows = np.repeat((pos * 10 + layer).astype(np.uint8)[:, None], k_row, axis=1)
        parts += [struct.pack("<iQ", 1, k_row), rows.tobytes()]
    for layer in range(n_layer):
        if v_trans:
            el = 2
            data = np.zeros((n_embd, n_cells * el), np.uint8)
            for j in range(n_embd):
                data[j, ::el] = (pos + j + layer) % 256
            parts += [struct.pack("<iII", 1, el, n_embd), data.tobytes()]
        else:
            rows = np.repeat(((pos + layer) % 256).astype(np.uint8)[:, None], 6, axis=1)
            parts += [struct.pack("<iQ", 1, 6), rows.tobytes()]
    return b"".join(parts)


@pytest.mark.parametrize("v_trans", [True, False])
def test_split_and_join_round_trip(v_trans: bool) -> None:
    blob = _fake_state(100, v_trans=v_trans)
    (section,) = kvstate.parse(blob)
    assert kvstate.serialize([section]) == blob
    pieces = [section.between(a, a + 32) for a in range(0, 100, 32)]
    assert [p.n_cells for p in pieces] == [32, 32, 32, 4]
    assert kvstate.serialize([kvstate.join(pieces)]) == blob
    # a prefix joined from pieces equals the same prefix cut directly
    direct = section.between(0, 64)
    assert kvstate.serialize([kvstate.join(pieces[:2])]) == kvstate.serialize([direct])


def test_cells_are_sorted_by_position() -> None:
    (section,) = kvstate.parse(_fake_state(40, v_trans=True, shuffle=True))
    assert list(section.positions()) == list(range(40))
    assert kvstate.serialize([section]) == _fake_state(40, v_trans=True)


@pytest.mark.parametrize(
    "blob", [b"", b"\x00" * 16, _fake_state(10, v_trans=True)[:-3], b"junk" * 10]
)
def test_malformed_state_raises(blob: bytes) -> None:
    with pytest.raises(kvstate.StateFormatError):
        kvstate.parse(blob)


@pytest.mark.parametrize("v_trans", [True, False])
def test_compose_equals_serialize_of_join(v_trans: bool) -> None:
    (section,) = kvstate.parse(_fake_state(70, v_trans=v_trans))
    (window,) = kvstate.parse(_fake_state(20, v_trans=v_trans))
    blocks = [section.between(a, a + 16) for a in range(0, 70, 16)]
    composed = kvstate.compose(blocks, [window])
    assert bytes(composed) == kvstate.serialize([kvstate.join(blocks), window])
    assert bytes(kvstate.compose(blocks, [])) == _fake_state(70, v_trans=v_trans)


def test_an_index_another_server_replaced_is_reopened_not_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kv = tmp_path / "kv"
    first = DiskTier(kv, capacity=1 << 30)
    first.put("a", b"x" * 40_000)
    second = DiskTier(kv, capacity=1 << 30)  # a second server process on the same dir
    for name in ("cache.db", "cache.db-wal"):  # NOTE: WAL mode: recent pages live in -wal
        db = kv / name
        if db.exists() and db.stat().st_size > 100:
            with db.open("r+b") as f:
                f.seek(100)
                f.write(np.random.default_rng(2).bytes(db.stat().st_size - 100))
    with caplog.at_level(logging.WARNING):
        assert "a" not in second  # the second one finds the damage first: sets it aside
        second.put("b", b"y")
        len(first)  # the first finds its index replaced: it joins the fresh one
        assert first.get("b") == b"y"
    assert len(_set_aside_warnings(caplog)) == 1
    assert len(list(tmp_path.glob("kv.broken-*"))) == 1
    first.close()
    second.close()
