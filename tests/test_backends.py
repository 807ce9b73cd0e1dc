"""Backends (issue 11) with fakes: manifest fields, routing, chunk and error mapping, and the
openai backend through the app against an httpx.MockTransport upstream."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.backends.checks import check_backends
from llmserve.backends.in_process import InProcessBackend
from llmserve.backends.pool import OpenAIBackend
from llmserve.backends.proxy import Upstream, chunk_events, upstream_error
from llmserve.catalog.library import ModelLibrary
from llmserve.catalog.manifest import ManifestError, parse_manifest
from llmserve.chat.tools import ToolCallDelta
from llmserve.config import Settings
from llmserve.errors import BackendError, UpstreamError
from llmserve.output import ReasoningDelta, TextDelta

pytestmark = pytest.mark.anyio
KEY = "sk-upstream-secret-123"
MANIFEST = """version: 1
models:
  remote:
    backend: openai
    base_url: http://upstream.test/v1
    api_key_env: TEST_UPSTREAM_KEY
    upstream_model: big/model
    aliases: [gpt-remote]
    sampling: {temperature: 0.3, top_k: 20}
  child:
    path: alpha.gguf
    backend: llama_server
    load: {n_ctx: 512, parallel: 2}
    args: [--flash-attn, "off"]
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, Path("models.yaml"))
    return info.value.lines()


def test_manifest_backend_fields() -> None:
    specs = parse_manifest(MANIFEST, Path("models.yaml"))
    remote, child = specs["remote"].backend, specs["child"].backend
    assert (remote.kind, remote.base_url, remote.api_key_env) == (
        "openai", "http://upstream.test/v1", "TEST_UPSTREAM_KEY")
    assert specs["remote"].filename == ""
    assert child.kind == "llama_server" and child.args == ("--flash-attn", "off")
    assert child.line == 12 and specs["child"].load["parallel"] == 2


@pytest.mark.parametrize(("entry", "expected"), [
    ("    backend: vllm\n    path: a.gguf\n", "models.yaml:4: models.x.backend: Input should be"),
    ("    backend: openai\n", "models.yaml:3: models.x: backend openai needs `base_url`"),
    ("    backend: llama_server\n", "missing required field 'path' (backend llama_server"),
    ("    path: a.gguf\n    args: [--x]\n", "models.x: args only apply to backend llama_server"),
    ("    backend: openai\n    base_url: http://h/v1\n    path: a.gguf\n", "drop `path`"),
    ("    path: a.gguf\n    base_url: http://h/v1\n", "base_url only apply to backend openai"),
])
def test_manifest_backend_errors(entry: str, expected: str) -> None:
    lines = _problems(f"version: 1\nmodels:\n  x:\n{entry}")
    assert any(expected in line for line in lines), lines


def test_missing_llama_server_is_a_manifest_error(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(MANIFEST)
    library = ModelLibrary(tmp_path)
    settings = Settings(models_dir=tmp_path, llama_server=tmp_path / "no-such-llama-server")
    with pytest.raises(ManifestError) as info:
        check_backends(library, settings)
    assert info.value.lines() == [
        f"{tmp_path / 'models.yaml'}:12: models.child.backend: --llama_server "
        f"{tmp_path / 'no-such-llama-server'} is not a file"
    ]


def test_backend_entries_stay_out_of_the_file_catalog(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(MANIFEST)
    library = ModelLibrary(tmp_path)
    assert set(library.backend_specs()) == {"remote", "child"}
    assert "remote" not in library.catalog() and "child" not in library.catalog()


def test_chunk_events() -> None:
    chunk = {"choices": [
        {"index": 0, "delta": {"reasoning_content": "hm", "content": "Hi"}},
        {"index": 1, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"a\""}}]}, "finish_reason": "tool_calls"},
    ]}
    events, finishes = chunk_events(chunk, chat=True)
    assert events == [ReasoningDelta("hm", 0), TextDelta("Hi", 0),
                      ToolCallDelta(0, "call_1", "f", "{\"a\"", 1)]
    assert finishes == {1: "tool_calls"}
    events, finishes = chunk_events(
        {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}, chat=False)
    assert events == [TextDelta("x", 0)] and finishes == {0: "length"}


def test_upstream_error_mapping() -> None:
    err = upstream_error("r", 404, b'{"error": {"message": "no such model", "type": '
                                   b'"not_found_error", "code": 404}}')
    assert isinstance(err, UpstreamError) and err.status == 404
    assert err.body() == {"error": {"message": "no such model", "type": "not_found_error",
                                    "param": None, "code": None}}
    err = upstream_error("r", 422, b'{"detail": "bad field"}')
    assert err.status == 422 and err.message == "bad field"
    err = upstream_error("r", 500, b"boom")
    assert isinstance(err, BackendError) and err.status == 502 and "500: boom" in err.message


# --- the openai backend through the app ---------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def text_chunks(*pieces: str, reason: str = "stop") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"content": p}}]}
                                 for p in pieces]
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    out.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(pieces),
                                         "prompt_tokens_details": {"cached_tokens": 3}}})
    return out


@pytest.fixture
def remote_app(fake_client: Any, fake_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`async with remote_app(handler) as (client, seen)`: the fake-engine app with models.yaml's
    `remote` entry answered by handler; seen collects the upstream requests."""
    import contextlib

    monkeypatch.setenv("TEST_UPSTREAM_KEY", KEY)
    (fake_models_dir / "models.yaml").write_text(MANIFEST)

    @contextlib.asynccontextmanager
    async def make(handler: Handler) -> Any:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        async with fake_client(script=["fake"]) as client:
            pool = client.app.state.manager.backends
            backend = pool.backend(pool.specs()["remote"])
            assert isinstance(backend, OpenAIBackend)
            backend._upstream = Upstream(
                "remote", "http://upstream.test/v1", KEY, connect_timeout=1, read_timeout=5,
                transport=httpx.MockTransport(record))
            yield client, seen

    return make


def _chat(model: str = "remote", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "keep_alive": 0, **kw}


async def test_openai_backend_chat(remote_app: Any) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(*text_chunks("Hel", "lo")))

    async with remote_app(handler) as (client, seen):
        r = await client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "remote"
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 2
        sent = json.loads(seen[0].content)
        assert sent["model"] == "big/model" and sent["stream"] is True
        assert "keep_alive" not in sent and sent["max_tokens"] == 5
        assert sent["temperature"] == 0.3 and sent["top_k"] == 20  # the entry's defaults
        assert seen[0].headers["authorization"] == f"Bearer {KEY}"
        assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
        # an extra alias routes there too; the in-process model still serves its file
        r = await client.post("/v1/chat/completions", json=_chat("gpt-remote"))
        assert r.json()["choices"][0]["message"]["content"] == "Hello"
        r = await client.post("/v1/chat/completions", json=_chat("alpha.gguf"))
        assert r.status_code == 200 and len(seen) == 2


async def test_openai_backend_stream_and_tools(remote_app: Any) -> None:
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": "call_9", "type": "function",
        "function": {"name": "get", "arguments": "{}"}}]}}]}
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("tools"):
            return httpx.Response(200, content=sse(call, end))
        return httpx.Response(200, content=sse(*text_chunks("a", "b", "c")))

    async with remote_app(handler) as (client, _):
        async with client.stream("POST", "/v1/chat/completions", json=_chat(
                stream=True, stream_options={"include_usage": True})) as r:
            lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
        assert text == "abc" and lines[-1] == "data: [DONE]"
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
        r = await client.post("/v1/chat/completions", json=_chat(tools=tools))
        message = r.json()["choices"][0]["message"]
        assert message["tool_calls"] == [
            {"id": "call_9", "type": "function", "function": {"name": "get", "arguments": "{}"}}]
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(("upstream", "status", "code"), [
    (httpx.Response(400, json={"error": {"message": "bad temperature", "type":
                                         "invalid_request_error", "param": "temperature"}}),
     400, None),
    (httpx.Response(401, json={"error": {"message": "Invalid API Key",
                                         "type": "authentication_error"}}), 401, None),
    (httpx.Response(503, text="overloaded"), 502, "backend_error"),
    (httpx.ConnectError("Connection refused"), 503, "backend_unavailable"),
    (httpx.ReadTimeout("slow"), 504, "backend_timeout"),
])
async def test_openai_backend_errors(remote_app: Any, upstream: Any, status: int,
                                     code: str | None) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        if isinstance(upstream, Exception):
            raise upstream
        return upstream

    async with remote_app(handler) as (client, _):
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json=_chat(stream=stream))
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert set(error) >= {"message", "type", "param", "code"}
            assert error["code"] == code
        if status == 400:
            assert r.json()["error"]["param"] == "temperature"


async def test_cut_stream_ends_with_an_error_event(remote_app: Any) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(*text_chunks("a")[:1], done=False))

    async with remote_app(handler) as (client, _):
        async with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
            assert r.status_code == 200
            lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "backend_error" and "before it finished" in error["message"]
        r = await client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error"


async def test_models_list_backends_without_keys(remote_app: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, content=sse(*text_chunks("x")))
        return httpx.Response(200, content=sse(
            {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}))

    async with remote_app(handler) as (client, _):
        r = await client.get("/models")
        assert KEY not in r.text
        rows = {m["name"]: m for m in r.json()["models"]}
        assert rows["remote"]["backend"] == "openai" and rows["remote"]["state"] == "ready"
        assert rows["child"]["backend"] == "llama_server"
        assert rows["child"]["state"] == "stopped" and rows["child"]["file"] == "alpha.gguf"
        assert rows["alpha.gguf"]["backend"] == "llama_cpp"
        assert rows["alpha.gguf"]["state"] == "ready"
        ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert {"remote", "gpt-remote", "child", "alpha.gguf"} <= set(ids)
        r = await client.post("/v1/completions", json={"model": "remote", "prompt": "p"})
        assert r.json()["choices"][0] | {"logprobs": None} == {
            "index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}


async def test_every_model_routes_to_a_backend(remote_app: Any) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="never asked")

    async with remote_app(handler) as (client, seen):
        pool = client.app.state.backends
        assert isinstance(pool.local, InProcessBackend)
        for name in (None, "alpha.gguf", "beta", "no-such-model"):
            assert pool.route(name) is pool.local  # a file name, or nothing an entry serves
        assert isinstance(pool.route("remote"), OpenAIBackend)
        assert pool.route("gpt-remote") is pool.route("remote")
        # what needs the template here is a 400 on other backends, nothing sent upstream
        chat = {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}
        r = await client.post("/apply-template", json=chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert "runs on backend openai" in r.json()["error"]["message"]
        r = await client.post("/v1/messages/count_tokens", json={**chat, "max_tokens": 5})
        assert r.status_code == 400 and "runs on backend openai" in r.text
        assert seen == []
        # the in-process engine answers the same routes
        r = await client.post("/apply-template", json={**chat, "model": "alpha.gguf"})
        assert r.status_code == 200 and r.json()["model"] == "alpha.gguf"


def test_peer_watcher_find_skips_self_and_the_dead() -> None:
    from llmserve.backends.peers import PeerWatcher
    from llmserve.discovery import Node

    watcher = PeerWatcher(own_port=8000)
    me = Node("me-8000", ["127.0.0.1"], 8000, models=["m1"])
    other = Node("box-9000", ["127.0.0.1"], 9000, models=["m1", "Gemma"])
    dead = Node("old-9001", ["127.0.0.1"], 9001, models=["m2"])
    assert watcher._is_self(me) and not watcher._is_self(other)
    watcher.nodes = {"box-9000": other, "old-9001": dead}
    watcher.alive = {"box-9000"}
    assert watcher.find("m1") is other and watcher.find("gemma") is other
    assert watcher.find("m2") is None
    assert watcher.models() == [("m1", other), ("Gemma", other)]


def test_install_llama_reuses_a_build_and_says_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from llmserve.backends import install

    assert install.pinned_version() == next(
        line.split("==")[1].strip() for line in (install._REQUIREMENTS).read_text().splitlines()
        if line.startswith("llama-cpp-python=="))
    built = tmp_path / "given" / "build" / "bin" / "llama-server"
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    args = SimpleNamespace(cuda=False, metal=False, output_dir=tmp_path / "given", jobs=None)
    assert install.run_install(args) == 0
    assert capsys.readouterr().out == f"{built}\n"
    # the default folder: a stamp of the same version and flags skips the build
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = install.default_dir(install.pinned_version(), "cpu")
    assert folder == (tmp_path / "cache" / "llmserve" / "llama-server" /
                      f"{install.pinned_version()}-cpu")
    monkeypatch.setattr(install.shutil, "which", lambda _: None)
    args = SimpleNamespace(cuda=True, metal=False, output_dir=None, jobs=1)
    assert install.run_install(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmserve: cmake is not installed") and err.count("\n") == 1
    (folder / "build" / "bin").mkdir(parents=True)
    (folder / "build" / "bin" / "llama-server").write_text("")
    (folder / install.STAMP).write_text(json.dumps(
        {"version": install.pinned_version(), "accel": "cpu"}))
    args = SimpleNamespace(cuda=False, metal=False, output_dir=None, jobs=1)
    assert install.run_install(args) == 0
    assert capsys.readouterr().out.strip() == str(folder / "build" / "bin" / "llama-server")
    assert install.installed_binaries() == [folder / "build" / "bin" / "llama-server"]
