"""What /v1/models and /health say about models (catalog/listing.py), on the fake engine."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from llmserve.hardware import machine_threads
from tests.conftest import app_client
from tests.ggufgen import tiny_llama

NO_DRAFT = {"draft": "none", "draft_model": None, "draft_max": 16, "draft_min": 0}

pytestmark = pytest.mark.anyio


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    tiny_llama(d / "alpha.gguf")  # a real header: trained context 4096
    (d / "zeta.gguf").write_bytes(b"GGUF fake")  # no readable header
    return d


class GatedFactory:
    """Fake engines whose loads wait for `gate` (set: no wait); records load settings."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.settings: dict[str, Settings] = {}

    def __call__(self, path: Path, settings: Settings) -> FakeEngine:
        self.gate.wait(10)
        self.settings[path.name] = settings
        return FakeEngine(path, n_ctx=settings.n_ctx or 1)  # the fake runs with what it is given


def make_app(models_dir: Path, factory: GatedFactory, **kw: Any) -> Any:
    from llmserve.http.app import create_app

    settings = Settings(models_dir=models_dir, templates_dir=models_dir / "t",
                        cache_dir=models_dir / "cache", no_announce=True, **kw)
    return create_app(settings, engine_factory=factory)


async def ids(client: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await client.get("/v1/models")).json()["data"]]


async def wait_for(client: httpx.AsyncClient, first: str) -> None:
    deadline = time.monotonic() + 60  # NOTE: a liveness bound; the callers assert the state
    while time.monotonic() < deadline:
        if (await ids(client))[:1] == [first]:
            return
        await asyncio.sleep(0.01)


async def test_the_model_loading_at_start_is_listed_first(models_dir: Path) -> None:
    factory = GatedFactory()
    factory.gate.clear()
    app = make_app(models_dir, factory, model_name="zeta.gguf")
    async with app_client(app, ready=False) as client:
        await wait_for(client, "zeta.gguf")
        loading = await ids(client)
        health = await client.get("/health")
        factory.gate.set()
        for _ in range(200):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        ready = await ids(client)
    assert loading == ["zeta.gguf", "alpha.gguf"]  # not alphabetical: zeta is loading
    assert health.status_code == 503  # still not ready: listing first is not being ready
    assert ready == ["zeta.gguf", "alpha.gguf"]


async def test_a_switch_lists_its_target_first_while_it_loads(models_dir: Path) -> None:
    factory = GatedFactory()
    async with app_client(make_app(models_dir, factory, model_name="alpha.gguf")) as client:
        before = await ids(client)
        factory.gate.clear()
        switch = asyncio.create_task(client.post("/setModel", json={"modelName": "zeta"}))
        await wait_for(client, "zeta.gguf")
        during = await ids(client)
        factory.gate.set()
        assert (await switch).status_code == 200
        after = await ids(client)
    assert before == ["alpha.gguf", "zeta.gguf"]
    assert during == ["zeta.gguf", "alpha.gguf"]
    assert after == ["zeta.gguf", "alpha.gguf"]


async def test_each_model_shows_its_context(models_dir: Path) -> None:
    factory = GatedFactory()
    async with app_client(make_app(models_dir, factory, model_name="zeta.gguf")) as client:
        unloaded = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        await client.post("/setModel", json={"modelName": "alpha"})
        loaded = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        health = (await client.get("/health")).json()
    alpha = unloaded["alpha.gguf"]
    assert alpha["context_length"] == 4096 and alpha["loaded"] is False  # would run with
    assert alpha["meta"]["n_ctx_train"] == 4096 and alpha["meta"]["n_embd"] == 64
    assert alpha["owned_by"] == "llmserve" and alpha["object"] == "model"  # kept
    zeta = unloaded["zeta.gguf"]
    assert zeta["loaded"] is True and zeta["meta"]["n_ctx_train"] is None
    assert zeta["context_length"] == factory.settings["zeta.gguf"].n_ctx == 4096  # fallback
    assert loaded["alpha.gguf"]["loaded"] is True
    assert loaded["alpha.gguf"]["context_length"] == 4096
    threads = machine_threads()
    assert health["n_ctx"] == 4096
    assert health["loaded_models"][-1] == {"model": "alpha.gguf", "n_ctx": 4096,
                                           "n_threads": threads, "n_threads_batch": threads,
                                           "parallel": 4, "cache_type_k": "f16",
                                           "cache_type_v": "f16", "flash_attn": "auto",
                                           **NO_DRAFT}  # fmt: skip


async def test_flags_override_what_is_shown_and_loaded(models_dir: Path) -> None:
    factory = GatedFactory()
    app = make_app(models_dir, factory, model_name="alpha.gguf", n_ctx=1000, n_threads=3,
                   parallel=2)
    async with app_client(app) as client:
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        health = (await client.get("/health")).json()
    assert models["alpha.gguf"]["context_length"] == 1000
    assert models["alpha.gguf"]["meta"]["n_ctx_train"] == 4096
    assert models["zeta.gguf"]["context_length"] == 1000  # would run with --n_ctx too
    loaded = factory.settings["alpha.gguf"]
    assert (loaded.n_ctx, loaded.n_threads, loaded.n_threads_batch) == (1000, 3, 3)
    assert health["loaded_models"] == [{"model": "alpha.gguf", "n_ctx": 1000, "n_threads": 3,
                                        "n_threads_batch": 3, "parallel": 2,
                                        "cache_type_k": "f16", "cache_type_v": "f16",
                                        "flash_attn": "auto",
                                        **NO_DRAFT}]


async def test_kv_types_flags_over_models_yaml_and_the_resolved_flash_attn(
    models_dir: Path,
) -> None:
    (models_dir / "models.yaml").write_text(
        "models:\n  alpha:\n    path: alpha.gguf\n"
        "    load: {cache_type_k: q4_0, cache_type_v: Q4_0, flash_attn: on}\n"
        "  zeta:\n    path: zeta.gguf\n    load: {cache_type_v: q5_1}\n")

    class Resolving(GatedFactory):
        def __call__(self, path: Path, settings: Settings) -> FakeEngine:
            engine = super().__call__(path, settings)
            # NOTE: as LlamaEngine reports llama.cpp's choice for auto
            resolved = "off" if settings.flash_attn == "auto" else settings.flash_attn
            engine.info = dataclasses.replace(engine.info, flash_attn=resolved)
            return engine

    factory = Resolving()
    app = make_app(models_dir, factory, model_name="alpha.gguf", cache_type_k="q8_0")
    async with app_client(app) as client:
        alpha = (await client.get("/health")).json()["loaded_models"]
        await client.post("/setModel", json={"modelName": "zeta"})
        zeta = (await client.get("/health")).json()["loaded_models"]
    loaded = factory.settings["alpha.gguf"]
    # the flag wins over models.yaml; models.yaml over the defaults
    assert (loaded.cache_type_k, loaded.cache_type_v, loaded.flash_attn) == ("q8_0", "q4_0", "on")
    assert [(m["cache_type_k"], m["cache_type_v"], m["flash_attn"]) for m in alpha] == [
        ("q8_0", "q4_0", "on")]
    assert factory.settings["zeta.gguf"].flash_attn == "auto"  # what was asked
    assert [(m["model"], m["cache_type_k"], m["cache_type_v"], m["flash_attn"]) for m in zeta
            ] == [("zeta.gguf", "q8_0", "q5_1", "off")]  # what llama.cpp made of auto
