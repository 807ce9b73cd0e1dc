"""cache_control on the real SmolLM2, in-process: a pinned prefix survives an eviction that
drops unpinned blocks, and usage reports what the prefix cache read and stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.http.app import create_app
from tests.conftest import MODELS_DIR, SMOL, app_client, require_model

pytestmark = [pytest.mark.real_model, pytest.mark.anyio]
PIN = {"type": "ephemeral"}


def system(tag: str) -> str:
    return f"{tag} handbook. " + " ".join(
        f"Item {tag}{i}: the {tag} parcel number {i} weighs {i * 7 + 3} grams." for i in range(24)
    )


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    require_model(SMOL)
    # NOTE: one sequence, so a repeated prompt can only come back from the prefix cache (the
    # slot holds the last request's KV, which shares nothing but the template's first tokens).
    settings = Settings(
        model_name=SMOL, models_dir=MODELS_DIR, cache_dir=tmp_path / "cache",
        prompt_cache="ram", parallel=1, n_ctx=2048, n_threads=2, no_announce=True,
    )
    app = create_app(settings)
    async with app_client(app) as c:
        for _ in range(600):
            if (await c.get("/health")).status_code == 200:
                break
            await _sleep(0.1)
        c.app = app  # type: ignore[attr-defined]
        yield c


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def ask(client: httpx.AsyncClient, tag: str, pinned: bool) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": system(tag)}
    if pinned:
        block["cache_control"] = PIN
    r = await client.post("/v1/messages", json={
        "model": SMOL, "max_tokens": 2, "temperature": 0, "system": [block],
        "messages": [{"role": "user", "content": "Which parcel is heaviest?"}],
    })
    assert r.status_code == 200, r.text
    app = client.app  # type: ignore[attr-defined]
    # NOTE: finished sequences are stored when the engine is idle: store them now
    await app.state.worker.call(app.state.manager.flush_all)
    usage: dict[str, Any] = r.json()["usage"]
    return usage


async def repeat_after_pressure(client: httpx.AsyncClient, pin_first: bool) -> tuple[
        dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Ask A, shrink the RAM tier to 1.6 prompts' worth, ask B and C (unpinned), then B and A
    again: (A's first usage, B's repeat, A's repeat)."""
    cache = client.app.state.cache  # type: ignore[attr-defined]
    cache.clear()
    cache.ram.capacity = 1 << 40
    a = "Pinned" if pin_first else "Plain"
    first = await ask(client, a, pinned=pin_first)
    cache.ram.capacity = int(cache.ram.bytes * 1.6)
    await ask(client, "Bravo", pinned=False)
    await ask(client, "Charlie", pinned=False)
    b_again = await ask(client, "Bravo", pinned=False)
    a_again = await ask(client, a, pinned=pin_first)
    return first, b_again, a_again


def total(usage: dict[str, Any]) -> int:
    return int(usage["input_tokens"] + usage["cache_read_input_tokens"]
               + usage["cache_creation_input_tokens"])


async def test_pinned_prefix_survives_eviction(client: httpx.AsyncClient) -> None:
    first, b_again, a_again = await repeat_after_pressure(client, pin_first=True)
    assert first["cache_read_input_tokens"] < 64
    assert first["cache_creation_input_tokens"] > 0.8 * total(first)
    # the system prompt (most of the prompt) was pinned: only its last partial block and the
    # question are evaluated again
    assert a_again["cache_read_input_tokens"] >= 0.7 * total(a_again)
    assert total(a_again) == total(first)
    # B's blocks were the unpinned ones, so they went when the tier overflowed
    assert b_again["cache_read_input_tokens"] < 64


async def test_unpinned_prefix_is_evicted_like_the_rest(client: httpx.AsyncClient) -> None:
    _first, _b_again, a_again = await repeat_after_pressure(client, pin_first=False)
    assert a_again["cache_read_input_tokens"] < 64


async def test_pin_covers_the_prefix_up_to_the_breakpoint(client: httpx.AsyncClient) -> None:
    cache = client.app.state.cache  # type: ignore[attr-defined]
    await ask(client, "Delta", pinned=True)
    engine = client.app.state.manager.engine  # type: ignore[attr-defined]
    count = await client.post("/v1/messages/count_tokens", json={
        "model": SMOL, "system": system("Delta"),
        "messages": [{"role": "user", "content": "Which parcel is heaviest?"}]})
    n = count.json()["input_tokens"]
    pinned = [k for k in list(cache.ram._items) if cache.ram.pinned(k)]
    blocks = [k for k in pinned if not k.startswith(("t", "w", "m"))]
    # every full block of the system message is pinned; the question's blocks are not
    assert 0 < len(blocks) * cache.block <= n
    assert len(blocks) >= (n - 64) // cache.block - 1
    assert engine is not None
