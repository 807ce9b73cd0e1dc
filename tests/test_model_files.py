"""Which files the server serves: symlinks out of the models dir, files that are no GGUF,
truncated downloads (checked before the active model is evicted)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from tests.conftest import MODELS_DIR, SMOL, app_client, require_model

pytestmark = pytest.mark.anyio

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextlib.asynccontextmanager
async def serve(
    models_dir: Path, *, real: bool = False, **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    from llmserve.http.app import create_app

    kw.setdefault("model_name", "alpha.gguf")
    settings = Settings(
        models_dir=models_dir, templates_dir=models_dir / "t", cache_dir=models_dir.parent / "c",
        no_announce=True, prompt_cache="off", **kw,
    )  # fmt: skip
    factory = None if real else (lambda path, s: FakeEngine(path))
    app = create_app(settings, engine_factory=factory)
    async with app_client(app) as client:
        client.manager = app.state.manager  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """models/ with alpha, beta, symlinks out (absolute, ../) and one in; outside/ beside it."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        (models / name).write_bytes(b"GGUF fake")
    (outside / "other.gguf").write_bytes(b"GGUF fake")
    (outside / "notes.txt").write_text("not a model\n")
    (models / "abs.gguf").symlink_to(outside / "other.gguf")
    (models / "rel.gguf").symlink_to(Path("..") / "outside" / "other.gguf")
    (models / "text.gguf").symlink_to(outside / "notes.txt")
    (models / "inner.gguf").symlink_to("alpha.gguf")
    return models


async def test_symlinks_out_of_the_models_dir_are_refused(linked: Path) -> None:
    async with serve(linked) as client:
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        described = [m["name"] for m in (await client.get("/models")).json()["models"]
                     if m["present"]]
        results = {}
        for name in ("abs.gguf", "rel", "text.gguf"):
            results[name] = await client.post("/setModel", json={"model_name": name})
        by_field = await client.post("/v1/chat/completions", json={**CHAT, "model": "rel.gguf"})
        status = (await client.get("/")).json()
        inner = await client.post("/v1/chat/completions", json={**CHAT, "model": "inner"})
    assert sorted(listed) == ["alpha.gguf", "beta.gguf", "inner.gguf"]
    assert sorted(described) == ["alpha.gguf", "beta.gguf", "inner.gguf"]
    for resp in [*results.values(), by_field]:
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_model" and "--allow_symlinks" in err["message"]
        assert str(linked.parent) not in err["message"]
    assert status["model"] == "alpha.gguf"
    assert inner.status_code == 200, inner.text  # a symlink within the dir is fine


async def test_allow_symlinks_serves_them(linked: Path) -> None:
    async with serve(linked, allow_symlinks=True) as client:
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        resp = await client.post("/setModel", json={"model_name": "rel"})
    assert {"abs.gguf", "rel.gguf", "text.gguf"} <= set(listed)
    assert resp.status_code == 200 and resp.json()["model"] == "rel.gguf"


def test_cli_serve_refuses_a_symlinked_start_model(linked: Path) -> None:
    from llmserve.catalog.library import ModelLibrary
    from llmserve.errors import InvalidModelError

    with pytest.raises(InvalidModelError):
        ModelLibrary(linked).resolve("abs")
    assert ModelLibrary(linked, allow_symlinks=True).resolve("abs") == "abs.gguf"


# --- real model: nothing is evicted for a file that cannot load ------------------------------


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    src = require_model(SMOL)
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    try:
        os.link(src, models / SMOL)
    except OSError:
        shutil.copyfile(src, models / SMOL)
    (models / "garbage.gguf").write_bytes(os.urandom(4096))
    (models / "empty.gguf").write_bytes(b"")
    with src.open("rb") as f:
        (models / "truncated.gguf").write_bytes(f.read(3 << 20))  # header intact, data cut
    (outside / "notes.txt").write_text("hello\n" * 100)
    (models / "text.gguf").symlink_to(outside / "notes.txt")
    return models


@pytest.mark.real_model
async def test_a_file_that_cannot_load_leaves_the_active_model(real_dir: Path) -> None:
    async with serve(real_dir, real=True, model_name=SMOL, n_ctx=512, n_threads=2,
                     allow_symlinks=True) as client:
        manager = client.manager  # type: ignore[attr-defined]
        assert manager.loaded_names() == [SMOL]
        for name in ("garbage", "empty.gguf", "truncated", "text.gguf"):
            resp = await client.post("/setModel", json={"model_name": name})
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["code"] == "invalid_model"
            assert name.removesuffix(".gguf") in err["message"]
            assert str(real_dir) not in err["message"] and str(MODELS_DIR) not in err["message"]
            by_field = await client.post("/v1/chat/completions", json={**CHAT, "model": name})
            assert by_field.status_code == 400
            assert by_field.json()["error"]["code"] == "invalid_model"
            assert manager.loaded_names() == [SMOL]
            assert (await client.get("/")).json()["model"] == SMOL
        chat = await client.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200, chat.text
        assert manager.loads == 1  # never evicted, never reloaded


async def test_a_load_failure_names_the_model_not_the_path(linked: Path) -> None:
    from llmserve.http.app import create_app

    def factory(path: Path, settings: Settings) -> FakeEngine:
        if path.name == "beta.gguf":
            raise RuntimeError(f"Failed to load model from file: {path}")
        return FakeEngine(path)

    settings = Settings(model_name="alpha.gguf", models_dir=linked, templates_dir=linked / "t",
                        cache_dir=linked.parent / "c", no_announce=True, prompt_cache="off")
    app = create_app(settings, engine_factory=factory)
    async with app_client(app) as client:
        resp = await client.post("/setModel", json={"model_name": "beta"})
        status = (await client.get("/")).json()
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_load_failed"
    message = resp.json()["error"]["message"]
    assert "beta.gguf" in message and str(linked) not in message
    assert status["model"] == "alpha.gguf" and str(linked) not in (status["error"] or "")
