"""Resident models on the fake engine: aliases, LRU and budget eviction, keep-alive, defaults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from tests.ggufgen import tiny_llama

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class RecordingEngine(FakeEngine):
    """A FakeEngine that remembers its load settings (FakeEngine records `params`)."""

    def __init__(self, path: Path, settings: Settings):
        super().__init__(path)
        self.settings = settings


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("alpha.gguf", "beta.gguf", "gamma.gguf"):
        (d / name).write_bytes(b"GGUF fake" + bytes(991))  # 1000 bytes each
    return d


@contextlib.asynccontextmanager
async def serve(models_dir: Path, **settings_kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    from llmserve.http.app import create_app

    engines: list[RecordingEngine] = []

    def factory(path: Path, settings: Settings) -> RecordingEngine:
        engine = RecordingEngine(path, settings)
        engines.append(engine)
        return engine

    settings_kw.setdefault("model_name", "alpha.gguf")
    settings = Settings(models_dir=models_dir, templates_dir=models_dir / "t", **settings_kw)
    app = create_app(settings, engine_factory=factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            client.engines = engines  # type: ignore[attr-defined]
            client.manager = app.state.manager  # type: ignore[attr-defined]
            for _ in range(200):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            yield client


async def chat(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    resp = await client.post("/v1/chat/completions", json={**CHAT, **extra})
    return resp


async def loaded(client: httpx.AsyncClient) -> list[str]:
    return list((await client.get("/models")).json()["loaded"])


def loads(client: httpx.AsyncClient) -> list[str]:
    return [e.info.name for e in client.engines]  # type: ignore[attr-defined]


async def test_switching_to_a_resident_model_costs_no_reload(models_dir: Path) -> None:
    async with serve(models_dir, max_loaded_models=2) as client:
        for name in ("beta.gguf", "alpha.gguf", "beta.gguf", "alpha"):
            resp = await chat(client, model=name)
            assert resp.status_code == 200
        status = (await client.get("/")).json()
        resident = await loaded(client)
        closed = [e.closed for e in client.engines]  # type: ignore[attr-defined]
    assert loads(client) == ["alpha.gguf", "beta.gguf"]  # each loaded once
    assert closed == [False, False]
    assert resident == ["beta.gguf", "alpha.gguf"]  # least recently used first
    assert status["model"] == "alpha.gguf"


async def test_least_recently_used_is_evicted(models_dir: Path) -> None:
    async with serve(models_dir, max_loaded_models=2) as client:
        for name in ("beta.gguf", "alpha.gguf", "gamma.gguf"):
            assert (await chat(client, model=name)).status_code == 200
        resident = await loaded(client)
        closed = {e.info.name: e.closed for e in client.engines}  # type: ignore[attr-defined]
    assert resident == ["alpha.gguf", "gamma.gguf"]
    assert closed == {"alpha.gguf": False, "beta.gguf": True, "gamma.gguf": False}


async def test_memory_budget_evicts(models_dir: Path) -> None:
    # each fake file is 1000 bytes and has no KV estimate: two do not fit in 1500
    async with serve(models_dir, max_loaded_models=3, memory_budget="1500") as client:
        assert (await chat(client, model="beta")).status_code == 200
        resident = await loaded(client)
        closed = [e.closed for e in client.engines]  # type: ignore[attr-defined]
    assert resident == ["beta.gguf"]
    assert closed == [True, False]


async def test_keep_alive_zero_unloads_after_the_request(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        resp = await chat(client, keep_alive=0)
        after = await loaded(client)
        first_closed = client.engines[0].closed  # type: ignore[attr-defined]
        health = await client.get("/health")
        again = await chat(client)  # no model named: the active one is loaded again
        now = await loaded(client)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    assert after == []
    assert first_closed
    assert health.status_code == 200
    assert again.status_code == 200
    assert loads(client) == ["alpha.gguf", "alpha.gguf"]
    assert now == ["alpha.gguf"]


async def test_idle_models_are_unloaded(models_dir: Path) -> None:
    async with serve(models_dir, idle_unload_seconds="0.2", max_loaded_models=2) as client:
        assert (await chat(client, model="beta", keep_alive=-1)).status_code == 200
        assert (await chat(client, model="alpha")).status_code == 200
        for _ in range(100):
            if await loaded(client) == ["beta.gguf"]:
                break
            await asyncio.sleep(0.05)
        resident = await loaded(client)
        closed = {e.info.name: e.closed for e in client.engines}  # type: ignore[attr-defined]
    assert resident == ["beta.gguf"]  # alpha idled out; beta asked to stay forever
    assert closed == {"alpha.gguf": True, "beta.gguf": False}


@pytest.mark.parametrize("value", ["soon", "5x", [1], True])
async def test_bad_keep_alive_is_400(models_dir: Path, value: Any) -> None:
    async with serve(models_dir) as client:
        resp = await chat(client, keep_alive=value)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "keep_alive"


MANIFEST = """\
models:
  a-model:
    path: alpha.gguf
    load: {n_ctx: 777, n_batch: 64}
    sampling: {temperature: 0.25, top_k: 7}
    chat_template: "X{% for m in messages %}{{ m.content }}{% endfor %}"
  tiny:
    path: tiny.gguf
    description: a synthetic GGUF
    use_cases: [testing]
"""


async def test_aliases_defaults_and_template_from_the_manifest(models_dir: Path) -> None:
    (models_dir / "models.yaml").write_text(MANIFEST)
    async with serve(models_dir, model_name="a-model", n_batch=128) as client:
        plain = await chat(client)
        explicit = await chat(client, temperature=0.9)
        assert explicit.status_code == 200
        switched = await client.post("/setModel", json={"modelName": "beta"})
        back = await client.post("/setModel", json={"modelName": "A-MODEL"})
    engine = client.engines[0]  # type: ignore[attr-defined]
    assert engine.info.name == "alpha.gguf"
    assert engine.settings.n_ctx == 777  # manifest load default
    assert engine.settings.n_batch == 128  # an explicit flag wins over the manifest
    assert (engine.params[0].temperature, engine.params[0].top_k) == (0.25, 7)
    assert (engine.params[1].temperature, engine.params[1].top_k) == (0.9, 7)
    assert plain.json()["usage"]["prompt_tokens"] == len("Xhi")  # the override rendered
    assert switched.json()["model"] == "beta.gguf"
    assert back.json()["model"] == "alpha.gguf"


async def test_extra_aliases_route_and_are_listed(models_dir: Path) -> None:
    (models_dir / "models.yaml").write_text(
        "models:\n"
        "  a-model:\n    path: alpha.gguf\n    aliases: [gpt-4o-mini, gpt-3.5-turbo]\n"
        "  gone:\n    path: missing.gguf\n    aliases: [gpt-4o]\n"
    )
    async with serve(models_dir, model_name="beta") as client:
        routed = await chat(client, model="gpt-4o-mini")
        folded = await client.post("/setModel", json={"modelName": "GPT-3.5-Turbo"})
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        missing = await chat(client, model="gpt-4o")
        unknown = await chat(client, model="gpt-5")
    assert routed.status_code == 200, routed.text
    assert routed.json()["model"] == "alpha.gguf"
    assert folded.json()["model"] == "alpha.gguf"
    assert {"gpt-4o-mini", "gpt-3.5-turbo"} <= set(listed) and "gpt-4o" not in listed
    assert missing.status_code == 404 and "not downloaded" in missing.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("../alpha.gguf", 400, "invalid_model_name"),
        ("a-model/../../etc", 400, "invalid_model_name"),
        (".alpha.gguf", 400, "invalid_model_name"),
        ("models.yaml", 404, "model_not_found"),
        ("nope", 404, "model_not_found"),
        ("smollm2-135m", 404, "model_not_found"),  # catalog alias, not downloaded
    ],
)
async def test_bad_names(models_dir: Path, name: str, status: int, code: str) -> None:
    (models_dir / "models.yaml").write_text(MANIFEST)
    async with serve(models_dir) as client:
        via_request = await chat(client, model=name)
        via_set = await client.post("/setModel", json={"modelName": name})
        still = (await client.get("/")).json()["model"]
    for resp in (via_request, via_set):
        assert resp.status_code == status
        assert resp.json()["error"]["code"] == code
    assert still == "alpha.gguf"
    if name == "smollm2-135m":
        assert "llmserve models pull smollm2-135m" in via_request.json()["error"]["message"]


async def test_models_route_describes_catalog_and_files(models_dir: Path) -> None:
    (models_dir / "models.yaml").write_text(MANIFEST)
    tiny_llama(models_dir / "tiny.gguf")
    async with serve(models_dir) as client:
        body = (await client.get("/models")).json()
    by_file = {m["file"]: m for m in body["models"]}
    tiny = by_file["tiny.gguf"]
    assert tiny["alias"] == "tiny" and tiny["description"] == "a synthetic GGUF"
    assert (tiny["arch"], tiny["quant"], tiny["context_length"]) == ("llama", "Q4_K_M", 4096)
    assert tiny["has_template"] is True and tiny["present"] is True and tiny["loaded"] is False
    alpha = by_file["alpha.gguf"]
    assert (alpha["alias"], alpha["loaded"], alpha["active"]) == ("a-model", True, True)
    assert alpha["arch"] is None  # not a real GGUF: listed anyway
    assert by_file["gamma.gguf"]["alias"] is None and by_file["gamma.gguf"]["present"]
    qwen = by_file["qwen2.5-0.5b-instruct-q4_k_m.gguf"]
    assert (qwen["present"], qwen["loaded"], qwen["alias"]) == (False, False, "qwen2.5-0.5b")
    assert qwen["quant"] == "Q4_K_M" and qwen["size_label"]
    expected_keys = {"alias", "file", "size", "arch", "quant", "context_length", "has_template",
                     "present", "loaded", "description"}  # fmt: skip
    assert all(expected_keys <= set(m) for m in body["models"])


async def test_invalid_manifest_is_ignored_by_the_server(models_dir: Path) -> None:
    (models_dir / "models.yaml").write_text("models:\n  a:\n    path: 3\n")
    async with serve(models_dir) as client:
        resp = await chat(client, model="beta")
        listing = await client.get("/models")
    assert resp.status_code == 200
    assert listing.status_code == 200


def test_suggest_model_prefers_present_then_small(models_dir: Path) -> None:
    from llmserve.catalog.registry import ModelManager
    from llmserve.scheduler import Scheduler

    (models_dir / "models.yaml").write_text(
        "models:\n"
        "  big: {path: beta.gguf, size: 5000000, use_cases: [chat]}\n"
        "  small: {path: missing.gguf, size: 10, use_cases: [chat]}\n"
        "  other: {path: gamma.gguf, use_cases: [code]}\n"
        "  lonely: {path: missing2.gguf, use_cases: [vision]}\n"
    )
    manager = ModelManager(Settings(models_dir=models_dir), FakeEngine, Scheduler())  # type: ignore[arg-type]
    assert manager.suggest_model("chat") == "big"  # present beats smaller but missing
    assert manager.suggest_model("CODE") == "other"
    assert manager.suggest_model("vision") is None
    assert manager.suggest_model("vision", present_only=False) == "lonely"
    assert manager.suggest_model("nothing") is None
