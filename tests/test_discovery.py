"""LAN discovery with real zeroconf on the loopback interface."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.discovery import Node, async_discover, txt_records
from llmserve.engine.fake import FakeEngine
from llmserve.http.app import create_app
from tests.conftest import ROOT, SMOL, ServerProcess, app_client, free_port

pytestmark = pytest.mark.anyio


async def _find(port: int, want: Any = lambda n: True, rounds: int = 4) -> Node | None:
    """The node announcing `port` (and satisfying `want`), browsing up to `rounds` times."""
    for _ in range(rounds):
        nodes = [n for n in await async_discover(timeout=1.5) if n.port == port]
        if nodes and want(nodes[0]):
            return nodes[0]
    return None


async def test_announced_updated_on_switch_and_withdrawn(fake_models_dir: Path) -> None:
    port = free_port()  # NOTE: only announced; nothing needs to listen on it
    settings = Settings(
        host="127.0.0.1", port=port, model_name="alpha.gguf", models_dir=fake_models_dir,
        api_key=["k"],
    )
    app = create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    async with app.router.lifespan_context(app):
        announcer = app.state.announcer
        await asyncio.wait_for(announcer.registered.wait(), timeout=20)
        node = await _find(port, lambda n: n.model == "alpha.gguf")
        assert node is not None
        assert node.addresses == ["127.0.0.1"]
        assert node.models == ["alpha.gguf", "beta.gguf"]
        assert node.auth is True and node.api_base == "/v1" and node.state == "ready"
        assert node.url == f"http://127.0.0.1:{port}/v1"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            switched = await client.post(
                "/setModel", json={"modelName": "beta"}, headers={"X-API-Key": "k"}
            )
        assert switched.status_code == 200
        updated = await _find(port, lambda n: n.model == "beta.gguf")
        assert updated is not None and updated.name == node.name
    assert await _find(port, rounds=1) is None


async def test_no_announce(fake_models_dir: Path) -> None:
    settings = Settings(port=free_port(), models_dir=fake_models_dir, model_name="alpha.gguf",
                        no_announce=True)
    app = create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    async with app.router.lifespan_context(app):
        assert app.state.announcer is None


async def test_server_starts_when_multicast_fails(
    fake_models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import llmserve.discovery as discovery

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(19, "No such device")

    monkeypatch.setattr(discovery, "AsyncZeroconf", broken)
    settings = Settings(port=free_port(), models_dir=fake_models_dir, model_name="alpha.gguf")
    app = create_app(settings, engine_factory=lambda p, _: FakeEngine(p))
    with caplog.at_level(logging.WARNING, logger="llmserve"):
        async with app_client(app) as client:
            chat = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            await asyncio.sleep(0.05)
    assert chat.status_code == 200
    warnings = [
        r for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "llmserve.discovery"
    ]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "LAN discovery disabled" in warnings[0].getMessage()


def test_txt_records_fit_255_bytes() -> None:
    names = [f"model-{i:03d}-with-a-long-file-name.gguf" for i in range(40)]
    txt = txt_records(version="1.2.3", model=names[0], models=names, state="ready", auth=False)
    assert len(f"models={txt['models']}".encode()) <= 255
    kept = txt["models"].split(",")
    assert kept == names[: len(kept)] and 1 < len(kept) < len(names)
    assert txt["auth"] == "0" and txt["api"] == "/v1" and txt["version"] == "1.2.3"


@pytest.mark.real_model
def test_cli_discover_finds_a_running_server(smol_server: ServerProcess) -> None:
    node: dict[str, Any] = {}
    for _ in range(5):  # NOTE: the announcement may still carry the pre-load state at first
        proc = subprocess.run(
            [sys.executable, "-m", "llmserve", "discover", "--timeout", "2", "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        node = next((n for n in json.loads(proc.stdout) if n["port"] == smol_server.port), {})
        if node.get("state") == "ready":
            break
    assert node, "the session server was not discovered"
    assert node["model"] == SMOL and node["auth"] is False
    assert node["url"] == f"{smol_server.base_url}/v1"
    assert httpx.get(node["url"] + "/models", timeout=10).json()["data"][0]["id"] == SMOL
    table = subprocess.run(
        [sys.executable, "-m", "llmserve", "discover", "--timeout", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "PORT"]
