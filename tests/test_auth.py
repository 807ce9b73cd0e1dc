"""API keys: every route but / and /health needs one (fake engine, in-process)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from llmserve.http.app import create_app
from llmserve.http.auth import is_loopback_host, key_matches, presented_keys
from tests.conftest import app_client

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789"
PUBLIC = {("GET", "/"), ("GET", "/health")}


def _routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the app itself."""
    app = create_app(Settings(no_announce=True), engine_factory=lambda p, s: FakeEngine(p))
    out = [
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        for method in ops
    ]
    return sorted(set(out))


PROTECTED = [r for r in _routes() if r not in PUBLIC]


@contextlib.asynccontextmanager
async def keyed_client(models_dir: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    s = Settings(model_name="alpha.gguf", models_dir=models_dir, no_announce=True, **settings)
    app = create_app(s, engine_factory=lambda p, _: FakeEngine(p))
    async with app_client(app) as client:
        yield client


def _auth_error(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    body = resp.json()
    if resp.request.url.path.startswith("/v1/messages"):  # Anthropic's error shape there
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_the_route_list_is_complete() -> None:
    paths = {p for _, p in PROTECTED}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings",
            "/tokenize", "/detokenize", "/chat", "/metrics", "/models", "/setModel"} <= paths


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
async def test_protected_route_needs_a_key(
    fake_models_dir: Path, method: str, path: str
) -> None:
    async with keyed_client(fake_models_dir, api_key=[KEY]) as client:
        missing = await client.request(method, path, json={})
        wrong = await client.request(method, path, json={}, headers={"X-API-Key": "nope"})
        bad_scheme = await client.request(
            method, path, json={}, headers={"Authorization": f"Basic {KEY}"}
        )
        bearer = await client.request(
            method, path, json={}, headers={"Authorization": f"Bearer {KEY}"}
        )
        header = await client.request(method, path, json={}, headers={"X-API-Key": KEY})
    for resp in (missing, wrong, bad_scheme):
        _auth_error(resp)
    assert "missing" in missing.json()["error"]["message"]
    # NOTE: with a key the route itself answers (some say 400 to an empty body).
    assert bearer.status_code != 401 and header.status_code != 401
    assert bearer.status_code == header.status_code


async def test_public_routes_and_unkeyed_server(fake_models_dir: Path) -> None:
    async with keyed_client(fake_models_dir, api_key=[KEY]) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/health")).status_code == 200
    async with keyed_client(fake_models_dir) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_keys_from_flags_env_and_file(
    fake_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("LLMSERVE_API_KEY", "env-a,env-b")
    async with keyed_client(fake_models_dir, api_key_file=key_file) as client:
        codes = {
            k: (await client.get("/v1/models", headers={"X-API-Key": k})).status_code
            for k in ("env-a", "env-b", "file-key-1", "file-key-2", "file-key-3", "#")
        }
    assert codes == {"env-a": 200, "env-b": 200, "file-key-1": 200, "file-key-2": 200,
                     "file-key-3": 401, "#": 401}


def test_bad_key_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        Settings(api_key_file=empty)
    with pytest.raises(ValueError, match="cannot read") as info:
        Settings(api_key_file=tmp_path / "missing.txt", api_key=["secret-value"])
    assert "secret-value" not in str(info.value)


def test_header_parsing_and_compare() -> None:
    headers = [(b"Authorization", b"bearer  abc "), (b"x-api-key", b"def"), (b"other", b"x")]
    assert presented_keys(headers) == [b"abc", b"def"]
    assert presented_keys([(b"authorization", b"Bearer")]) == []
    assert key_matches(b"k2", [b"k1", b"k2"])
    assert not key_matches(b"k", [b"k1", b"k2"])
    assert not key_matches(b"k1", [])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.org", False)],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(("host", "keys", "warns"), [
    ("0.0.0.0", [], True), ("0.0.0.0", [KEY], False), ("127.0.0.1", [], False),
])
async def test_open_lan_server_warns(
    fake_models_dir: Path, caplog: pytest.LogCaptureFixture, host: str, keys: list[str],
    warns: bool,
) -> None:
    with caplog.at_level(logging.WARNING, logger="llmserve"):
        async with keyed_client(fake_models_dir, host=host, api_key=keys):
            pass
    warned = [r for r in caplog.records if "without an API key" in r.getMessage()]
    assert bool(warned) is warns


def test_cli_key_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmserve.cli import _settings, build_parser

    keys = tmp_path / "keys"
    keys.write_text("from-file\n")
    args = build_parser().parse_args(
        ["serve", "--api_key", "a", "--api-key", "b", "--api_key_file", str(keys),
         "--no_announce"]
    )
    s = _settings(args)
    assert s.api_keys() == ["a", "b", "from-file"] and s.no_announce is True
    monkeypatch.setenv("LLMSERVE_API_KEY", "env")
    s = _settings(build_parser().parse_args(["serve"]))
    assert s.api_keys() == ["env"] and s.no_announce is False
    s = _settings(build_parser().parse_args(["serve", "--api_key", "flag"]))
    assert s.api_keys() == ["flag"]  # the flag wins over the environment
