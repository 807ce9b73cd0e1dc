"""Prompt cache on the real GGUFs: same output as no cache, persistence, integrity."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.engine.base import MIN_EVAL
from tests.conftest import GEMMA, SMOL, ServerProcess, require_model, started_server

pytestmark = pytest.mark.real_model

SYSTEM = "You are a careful agent. " + " ".join(
    f"Rule {i}: use tool_{i} for questions about topic {i}." for i in range(14)
)


def chat(server: ServerProcess, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 12}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def agent_session(server: ServerProcess, model: str) -> list[tuple[str, int]]:
    """Two interleaved conversations, two turns each, then one repeated: (text, cached)."""
    convs = {k: [{"role": "system", "content": SYSTEM}] for k in "AB"}
    out = []
    for turn in range(2):
        for k, conv in convs.items():
            conv.append({"role": "user", "content": f"[{k}{turn}] What is {turn} plus {len(k)}?"})
            body = chat(server, model, conv)
            text = body["choices"][0]["message"]["content"]
            conv.append({"role": "assistant", "content": text})
            out.append((text, body["usage"]["prompt_tokens_details"]["cached_tokens"]))
    body = chat(server, model, convs["A"][:2])
    out.append((body["choices"][0]["message"]["content"],
                body["usage"]["prompt_tokens_details"]["cached_tokens"]))
    return out


def start(tmp: Path, name: str, *args: str) -> ServerProcess:
    return started_server(tmp / f"{name}.log", "--model_name", SMOL, "--n_ctx", "2048",
                          "--n_threads", "2", *args)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    cached = start(tmp_path, "tiered", "--cache_dir", str(tmp_path / "cache"))
    try:
        plain = start(tmp_path, "off", "--prompt_cache", "off")
    except Exception:
        cached.stop()
        raise
    try:
        yield cached, plain
    finally:
        cached.stop()
        plain.stop()


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_cached_output_equals_uncached(
    servers: tuple[ServerProcess, ServerProcess], model: str
) -> None:
    require_model(model)
    cached, plain = servers
    # switching models unloads the other one, so every later turn here is a real restore
    other = GEMMA if model == SMOL else SMOL
    chat(cached, other, [{"role": "user", "content": "hi"}])
    with_cache = agent_session(cached, model)
    chat(cached, other, [{"role": "user", "content": "hi"}])
    again = chat(cached, model, [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": "[A0] What is 0 plus 1?"}])
    without = agent_session(plain, model)
    assert [t for t, _ in with_cache] == [t for t, _ in without]
    assert all(c == 0 for _, c in without)
    assert with_cache[0][1] == 0  # cold
    assert all(c > 100 for _, c in with_cache[1:])  # system prompt (and history) reused
    assert again["choices"][0]["message"]["content"] == with_cache[0][0]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 100
    stats = httpx.get(f"{cached.base_url}/cache").json()
    assert stats["hits"] >= 5 and stats["tokens_reused"] > 0
    assert stats["disk"]["entries"] > 0


def restore(server: ServerProcess, messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.base_url}/restore_cache", json={"messages": messages, **kw},
                   timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


CONV = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which tool for 7?"}]


def test_restore_cache_then_restart(tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    first = start(tmp_path, "first", "--cache_dir", cache_dir)
    try:
        dry = restore(first, CONV, dry_run=True)
        warm = restore(first, CONV)
        again = restore(first, CONV)
        reply = chat(first, SMOL, CONV)
    finally:
        first.stop()
    assert dry["cached_tokens"] == 0 and dry["evaluated_tokens"] == 0
    assert warm["evaluated_tokens"] == warm["prompt_tokens"] > 150
    assert again["evaluated_tokens"] == 0
    assert again["cached_tokens"] == again["prompt_tokens"]
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == warm["prompt_tokens"] - MIN_EVAL

    second = start(tmp_path, "second", "--cache_dir", cache_dir)
    try:
        dry2 = restore(second, CONV, dry_run=True)
        reply2 = chat(second, SMOL, CONV)
        unrelated = restore(second, [{"role": "user", "content": "Something else entirely."}],
                            dry_run=True)
    finally:
        second.stop()
    assert dry2["cached_tokens"] == warm["prompt_tokens"]  # found on disk after a restart
    assert reply2["choices"][0]["message"] == reply["choices"][0]["message"]
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert unrelated["cached_tokens"] < 16  # only the live "<|im_start|>system..." overlap


def test_corrupted_cache_is_dropped_not_restored(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = start(tmp_path, "first", "--cache_dir", str(cache_dir))
    try:
        restore(first, CONV)
        reference = chat(first, SMOL, CONV)["choices"][0]["message"]["content"]
    finally:
        first.stop()
    damaged = 0
    for f in sorted(cache_dir.rglob("*.val")):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data[: len(data) - 7]))
        damaged += 1
    assert damaged > 0
    second = start(tmp_path, "second", "--cache_dir", str(cache_dir))
    try:
        body = chat(second, SMOL, CONV)
        healthy = httpx.get(f"{second.base_url}/health").status_code
    finally:
        second.stop()
    assert body["choices"][0]["message"]["content"] == reference
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert healthy == 200
    assert "corrupted entry" in second.log()


def test_two_servers_share_one_cache_dir(tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    a = start(tmp_path, "a", "--cache_dir", cache_dir)
    b = start(tmp_path, "b", "--cache_dir", cache_dir)
    try:
        convs = [[*CONV[:1], {"role": "user", "content": f"Question {i}?"}] for i in range(4)]
        for i, conv in enumerate(convs):
            restore(a if i % 2 else b, conv)
        reference = [chat(a, SMOL, c)["choices"][0]["message"]["content"] for c in convs]
    finally:
        a.stop()
        b.stop()
    c = start(tmp_path, "c", "--cache_dir", cache_dir)
    try:
        dry = [restore(c, conv, dry_run=True) for conv in convs]
        replies = [chat(c, SMOL, conv)["choices"][0]["message"]["content"] for conv in convs]
    finally:
        c.stop()
    assert all(d["cached_tokens"] == d["prompt_tokens"] for d in dry)
    assert replies == reference


def test_llama_disk_mode(tmp_path: Path) -> None:
    """llama-cpp-python's LlamaDiskCache, unchanged: restores after a restart too."""
    args = ("--prompt_cache", "llama_disk", "--cache_dir", str(tmp_path / "cache"))
    server = start(tmp_path, "first", *args)
    try:
        first = chat(server, SMOL, CONV)
    finally:
        server.stop()
    server = start(tmp_path, "second", *args)
    try:
        second = chat(server, SMOL, CONV)
    finally:
        server.stop()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 150
    assert (tmp_path / "cache" / "llama_disk").is_dir()


def disk_entries(server: ServerProcess, at_least: int = 1) -> int:
    """GET /cache's disk entries once the writer thread has stored at_least of them."""
    entries = 0
    for _ in range(100):
        r = httpx.get(f"{server.base_url}/cache", timeout=30)
        assert r.status_code == 200, r.text
        entries = r.json()["disk"]["entries"]
        if entries >= at_least:
            break
        time.sleep(0.1)
    return int(entries)


def asks(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"Which tool for {i}?"}] for i in range(n)]


@pytest.mark.parametrize("damage", ["random-index", "kv-is-a-file"])
def test_unreadable_cache_index_is_set_aside(tmp_path: Path, damage: str) -> None:
    cache_dir = tmp_path / "cache"
    first = start(tmp_path, "first", "--cache_dir", str(cache_dir))
    try:
        chat(first, SMOL, CONV)
        assert disk_entries(first) > 0
    finally:
        first.stop()
    kv = cache_dir / "kv"
    if damage == "random-index":
        (kv / "cache.db").write_bytes(os.urandom(200_000))
    else:
        shutil.rmtree(kv)
        kv.write_text("not a folder\n")
    second = start(tmp_path, "second", "--cache_dir", str(cache_dir))
    try:
        replies = [chat(second, SMOL, conv) for conv in [CONV, *asks(2)]]
        stored = disk_entries(second)
        stats = httpx.get(f"{second.base_url}/cache", timeout=30)
    finally:
        second.stop()
    assert all(r["choices"][0]["message"]["content"] is not None for r in replies)
    assert stats.status_code == 200 and stored > 0  # the fresh index stores again
    log = second.log()
    assert log.count("set aside as kv.broken-") == 1, log
    assert "Traceback" not in log
    assert len(list(cache_dir.glob("kv.broken-*"))) == 1 and kv.is_dir()


def test_index_corrupted_while_serving_is_replaced_once(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    server = start(tmp_path, "live", "--cache_dir", str(cache_dir))
    try:
        chat(server, SMOL, CONV)
        before = disk_entries(server)
        for name in ("cache.db", "cache.db-wal"):  # the SQLite header stays; pages are noise
            db = cache_dir / "kv" / name
            if db.exists() and db.stat().st_size > 100:
                with db.open("r+b") as f:
                    f.seek(100)
                    f.write(os.urandom(db.stat().st_size - 100))
        replies = [chat(server, SMOL, conv) for conv in asks(2)]
        # NOTE: SQLite may still write into a damaged file; whichever call first reads a bad
        # page (a lookup, a write, GET /cache) sets the index aside.
        stats = httpx.get(f"{server.base_url}/cache", timeout=30)
        replies += [chat(server, SMOL, conv) for conv in asks(4)[2:]]
        stored = disk_entries(server)
    finally:
        server.stop()
    assert before > 0 and len(replies) == 4
    assert stats.status_code == 200 and stored > 0  # the fresh index stores again
    log = server.log()
    assert log.count("set aside as kv.broken-") == 1, log
    assert "Traceback" not in log and " ERROR " not in log.upper().replace("ERROR:", " ERROR ")
