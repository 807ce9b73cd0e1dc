"""Pins in the prompt cache (Anthropic cache_control): pinned blocks are evicted last."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from llmserve.cache.manager import PrefixCache
from llmserve.cache.prefix import block_keys, tail_key
from llmserve.cache.store import RamTier


def test_pinned_keys_outlive_newer_unpinned_ones() -> None:
    ram = RamTier(capacity=300)
    ram.pin(["a"], 60)
    for key in "abc":
        ram.put(key, b"x" * 100)
    ram.put("d", b"x" * 100)  # over capacity: b (oldest unpinned) goes, not a
    assert "a" in ram and "b" not in ram and "c" in ram and "d" in ram
    ram.put("e", b"x" * 100)
    assert "a" in ram and "c" not in ram


def test_unpinned_newcomer_is_dropped_when_everything_else_is_pinned() -> None:
    ram = RamTier(capacity=200)
    ram.pin(["a", "b"], 60)
    ram.put("a", b"x" * 100)
    ram.put("b", b"x" * 100)
    ram.put("c", b"x" * 100)
    assert "a" in ram and "b" in ram and "c" not in ram


def test_all_pinned_evicts_the_oldest_and_expired_pins_count_as_none() -> None:
    ram = RamTier(capacity=200)
    ram.pin(["a", "b", "c"], 60)
    for key in "abc":
        ram.put(key, b"x" * 100)
    assert "a" not in ram and "b" in ram and "c" in ram
    ram.pin(["b"], -1)  # a shorter pin never shortens a longer one
    assert ram.pinned("b")
    fresh = RamTier(capacity=200)
    fresh.pin(["a"], -1)
    assert not fresh.pinned("a")
    fresh.put("a", b"x" * 100)
    fresh.put("b", b"x" * 100)
    fresh.put("c", b"x" * 100)
    assert "a" not in fresh
    fresh.pin(["b"], 60)
    fresh.clear()
    assert not fresh.pinned("b")


def test_prefix_cache_pins_blocks_end_and_window(tmp_path: Path) -> None:
    cache = PrefixCache("ram", tmp_path, 10_000, 0, block_tokens=4)
    engine = SimpleNamespace(fingerprint="fp")
    tokens = list(range(10))
    assert cache.pin(engine, tokens, 60) == 10  # type: ignore[arg-type]
    keys = block_keys("fp", tokens, 4)
    tail = tail_key(keys[-1], tokens[8:])
    assert cache.ram is not None
    assert all(cache.ram.pinned(k) for k in [*keys, tail, "w" + tail, "w" + keys[0], "mfp"])
    assert not cache.ram.pinned(block_keys("fp", [9, *tokens[1:]], 4)[0])
    off = PrefixCache("off", tmp_path, 10_000, 0, block_tokens=4)
    assert off.pin(engine, tokens, 60) == 0  # type: ignore[arg-type]
    cache.close()
    off.close()


def test_uncached_counts_missing_blocks_and_end(tmp_path: Path) -> None:
    cache = PrefixCache("ram", tmp_path, 10_000, 0, block_tokens=4)
    engine = SimpleNamespace(fingerprint="fp")
    tokens = list(range(10))
    assert cache.uncached(engine, tokens) == 10  # type: ignore[arg-type]
    keys = block_keys("fp", tokens, 4)
    assert cache.ram is not None
    cache.ram.put(keys[0], b"kv")
    assert cache.uncached(engine, tokens) == 6  # type: ignore[arg-type]
    cache.ram.put(keys[1], b"kv")
    cache.ram.put(tail_key(keys[1], tokens[8:]), b"kv")
    assert cache.uncached(engine, tokens) == 0  # type: ignore[arg-type]
    assert cache.uncached(SimpleNamespace(fingerprint=""), tokens) == 0  # type: ignore[arg-type]
    cache.close()
