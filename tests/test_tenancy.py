"""Prompt-cache partitions as plain data (llmserve/tenancy.py) and the key the auth
middleware hands to the code serving a request."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmserve.cache.manager import in_partition
from llmserve.engine.base import ModelInfo
from llmserve.http.auth import APIKeyMiddleware, key_id
from llmserve.tenancy import current_key, partition, request_partition, salted


def test_partitions() -> None:
    assert partition(None, None) == "" and partition("", "") == ""
    parts = {partition("key_a", None), partition("key_b", None), partition(None, "s"),
             partition("key_a", "s"), partition("key_b", "s")}
    assert len(parts) == 5 and "" not in parts
    assert partition("key_a", "s") == partition("key_a", "s")
    # NOTE: the separator keeps (key, salt) pairs apart that concatenate alike
    assert partition("key_a", "bc") != partition("key_ab", "c")
    assert salted("fp", "") == "fp" and salted("fp", "p") != "fp" and salted("", "p") == ""


def test_request_partition_reads_the_current_key() -> None:
    assert request_partition("s", False) == partition(None, "s")
    token = current_key.set("key_a")
    try:
        assert request_partition(None, False) == partition("key_a", None)
        assert request_partition(None, True) == ""  # --share_prompt_cache
        assert request_partition("s", True) == partition(None, "s")
    finally:
        current_key.reset(token)
    assert current_key.get() is None


def test_in_partition_salts_the_fingerprint_only_when_needed() -> None:
    class Engine:
        info = ModelInfo("m.gguf", "m.gguf", 512)
        fingerprint = "abc"

    engine = Engine()
    assert in_partition(engine, "") is engine  # type: ignore[arg-type]
    keyed = in_partition(engine, "p")  # type: ignore[arg-type]
    assert keyed.fingerprint == salted("abc", "p") and keyed.info is engine.info  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_the_middleware_sets_the_key_for_the_request() -> None:
    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"key": current_key.get()})

    app = APIKeyMiddleware(Starlette(routes=[Route("/who", who)]), ["ka", "kb"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for key in ("ka", "kb"):
            r = await client.get("/who", headers={"Authorization": f"Bearer {key}"})
            assert r.json() == {"key": key_id(key.encode())}
        assert (await client.get("/who")).status_code == 401
    assert current_key.get() is None
