"""Robustness against hostile or broken requests (issues 13 and 14), on the fake engine:
body limits, JSON depth, lone surrogates, non-finite numbers, limits before work, errors after
a stream started, embeddings that stop when the client leaves, and what /health reports."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from llmserve.http.guard import MAX_JSON_DEPTH, check_json
from tests.test_http import CHAT, assert_error, sse_events

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
ROUTES = ["/tokenize", "/detokenize", "/chat", "/v1/chat/completions", "/v1/completions",
          "/v1/embeddings", "/apply-template"]


async def post(client: Any, path: str, raw: str | bytes) -> Any:
    return await client.post(path, content=raw, headers=JSON)


@pytest.mark.parametrize("path", ROUTES)
async def test_deeply_nested_json_is_400_everywhere(fake_client: Any, path: str) -> None:
    deep = "[" * 10_000 + "]" * 10_000
    objects = '{"a":' * 10_000 + "1" + "}" * 10_000
    shallow_enough = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    async with fake_client() as client:
        for inner in (deep, objects, shallow_enough):
            for raw in (inner, f'{{"content": {inner}, "messages": {inner}, "input": {inner}}}'):
                assert_error(await post(client, path, raw), 400)
        ok = await client.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200


def test_check_json_is_iterative_and_names_the_field() -> None:
    check_json({"a": [[[1]]], "b": "ok", "c": 1.5})
    with pytest.raises(Exception, match="finite") as err:
        check_json({"x": [{"y": float("inf")}]})
    assert err.value.param == "x.0.y"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages.0.content"),
        ("/v1/chat/completions",
         '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
         "messages.0.content.0.text"),
        ("/v1/completions", '{"prompt": "x\\udbff"}', "prompt"),
        ("/v1/embeddings", '{"input": ["ok", "\\ud800"]}', "input.1"),
        ("/chat", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/chat/completions",
         '{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', "\\ud800"),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(
    fake_client: Any, path: str, body: str, param: str
) -> None:
    async with fake_client() as client:
        err = assert_error(await post(client, path, body), 400)
        # a real surrogate pair (an emoji) is fine
        ok = await post(client, "/v1/chat/completions",
                        '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert err["param"] == param
    assert ok.status_code == 200


NON_FINITE = ["Infinity", "-Infinity", "NaN", "1e309", '"inf"', '"nan"']


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in ("repeat_penalty", "temperature", "top_p", "presence_penalty")
     for v in NON_FINITE] + [("repeat_penalty", "0"), ("repeat_penalty", "11")],
)
async def test_float_parameters_must_be_finite_and_in_range(
    fake_client: Any, field: str, value: str
) -> None:
    raw = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
    async with fake_client() as client:
        err = assert_error(await post(client, "/v1/chat/completions", raw), 400)
        cmpl = await post(client, "/v1/completions", f'{{"prompt": "hi", "{field}": {value}}}')
    assert err["param"] == field
    assert_error(cmpl, 400)


async def test_body_size_is_bounded_with_413(fake_client: Any) -> None:
    big = json.dumps({"prompt": "x" * 5000})
    async with fake_client({"max_body_bytes": 4096}) as client:
        declared = await post(client, "/v1/completions", big)

        async def chunks() -> Any:  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"x" * 1000

        streamed = await client.post("/v1/completions", content=chunks(), headers=JSON)
        small = await client.post("/v1/completions", json={"prompt": "hi"})
    for resp in (declared, streamed):
        assert assert_error(resp, 413, "request_too_large")
    assert small.status_code == 200


async def test_slow_body_is_408(fake_client: Any) -> None:
    async with fake_client({"timeout_body": 0.2}) as client:
        messages: list[Any] = []

        async def receive() -> dict[str, Any]:
            if not messages:
                messages.append(1)
                return {"type": "http.request", "body": b'{"pro', "more_body": True}
            await asyncio.sleep(30)  # never sends the rest
            return {"type": "http.disconnect"}

        sent: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                 "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                 "client": ("127.0.0.1", 1), "server": ("t", 80), "asgi": {"version": "3.0"}}
        await asyncio.wait_for(client.app(scope, receive, send), 10)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


async def test_messages_per_request_are_limited(fake_client: Any) -> None:
    many = {"messages": [{"role": "user", "content": "hi"}] * 11}
    async with fake_client({"max_messages": 10}) as client:
        err = assert_error(await client.post("/v1/chat/completions", json=many), 400)
        template = await client.post("/apply-template", json=many)
        ok = await client.post("/v1/chat/completions", json={"messages": many["messages"][:10]})
    assert err["param"] == "messages" and "10" in err["message"]
    assert_error(template, 400)
    assert ok.status_code == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_empty_prompt_is_400_not_a_cut_stream(fake_client: Any, stream: bool) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "", "stream": stream})
    assert assert_error(resp, 400)["param"] == "prompt"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", {**CHAT, "stream": True}),
     ("/v1/completions", {"prompt": "hi", "stream": True})],
)
async def test_failure_mid_stream_ends_with_an_error_event(
    fake_client: Any, path: str, body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_client({"stream_interval_ms": 0}, script=["a", "b", "c", "d"],
                           fail_after=2) as client:
        resp = await client.post(path, json=body)
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    texts = [e for e in events[:-2] if "error" not in e]
    assert texts  # the tokens before the failure were delivered
    request_id = texts[0]["id"]
    assert any(request_id in r.getMessage() for r in caplog.records)


async def test_failure_mid_plain_chat_says_so(fake_client: Any) -> None:
    async with fake_client({"stream_interval_ms": 0}, fail_after=2) as client:
        resp = await client.post("/chat", json={"prompt": "hi"})
    assert resp.status_code == 200
    assert resp.text.startswith("Hello,") and "[error:" in resp.text


async def test_failure_without_stream_is_500_in_the_error_shape(fake_client: Any) -> None:
    async with fake_client(fail_after=2) as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
    assert_error(resp, 500)


async def test_embeddings_stop_when_the_client_leaves(fake_client: Any) -> None:
    async with fake_client(embed_delay=0.05) as client:
        engine = client.engines[0]
        body = json.dumps({"input": [f"text {i}" for i in range(60)]}).encode()
        state = {"sent": False}

        async def receive() -> dict[str, Any]:
            if not state["sent"]:
                state["sent"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings",
                 "headers": [(b"content-type", b"application/json")], "query_string": b"",
                 "root_path": "", "scheme": "http", "http_version": "1.1",
                 "client": ("127.0.0.1", 1), "server": ("t", 80), "asgi": {"version": "3.0"}}
        await asyncio.wait_for(client.app(scope, receive, send), 30)
        # the engine thread is free again well before 60 inputs' worth of work
        tok = await asyncio.wait_for(client.post("/tokenize", json={"content": "a"}), 30)
        done = engine.embedded
    assert tok.status_code == 200
    assert 0 < done < 60


async def test_health_body_reports_engine_and_cache(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.get("/health")
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "ok"
    assert body["model"] == "alpha.gguf" and body["loaded"] == ["alpha.gguf"]
    assert body["engine"]["alive"] is True and body["engine"]["idle"] is True
    assert body["engine"]["seconds_since_progress"] < 30
    assert {"mode", "ram_entries", "hits", "misses"} <= set(body["cache"])


async def test_health_is_503_when_the_engine_is_wedged(fake_client: Any) -> None:
    async with fake_client({"health_stall_seconds": 0.3}) as client:
        worker = client.app.state.worker
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stuck() -> None:  # a call that never returns (until released)
            while not release.is_set():
                time.sleep(0.01)

        job = asyncio.ensure_future(worker.call(stuck))
        await asyncio.sleep(0.8)
        wedged = await client.get("/health")
        loop.call_soon(release.set)
        await job
        await asyncio.sleep(0.05)
        healthy = await client.get("/health")
    assert wedged.status_code == 503
    body = wedged.json()
    assert body["status"] == "wedged" and "no progress" in body["error"]["message"]
    assert body["engine"]["busy_seconds"] > 0.3
    assert healthy.status_code == 200


async def test_health_stays_200_while_another_model_loads(fake_client: Any) -> None:
    import threading

    gate = threading.Event()
    async with fake_client({"max_loaded_models": 2}) as client:
        factory_engines = client.engines
        original = client.app.state.manager._factory

        def slow(path: Any, settings: Any) -> Any:
            gate.wait(10)
            return original(path, settings)

        client.app.state.manager._factory = slow
        switching = asyncio.ensure_future(
            client.post("/v1/chat/completions", json={**CHAT, "model": "beta.gguf"}))
        await asyncio.sleep(0.3)
        during = await client.get("/health")
        gate.set()
        await switching
    assert during.status_code == 200, during.text
    assert during.json()["state"] == "loading"
    assert factory_engines


async def test_shutdown_does_not_wait_for_a_wedged_engine(fake_models_dir: Any,
                                                          tmp_path: Any) -> None:
    import threading

    from llmserve.config import Settings
    from llmserve.engine.fake import FakeEngine
    from llmserve.http.app import create_app
    from tests.conftest import app_client

    settings = Settings(model_name="alpha.gguf", models_dir=fake_models_dir,
                        cache_dir=tmp_path / "cache", no_announce=True)
    app = create_app(settings, engine_factory=lambda p, s: FakeEngine(p))
    release = threading.Event()
    try:
        context = app_client(app)
        await context.__aenter__()
        stuck = asyncio.ensure_future(app.state.worker.call(release.wait, 120))
        await asyncio.sleep(0.2)
        # a liveness bound: before the fix shutdown waited for the stuck call (120 s)
        await asyncio.wait_for(context.__aexit__(None, None, None), 20)
    finally:
        release.set()
    assert not stuck.done() or stuck.cancelled() or stuck.result() is True


def test_cutter_cuts_only_before_unstraddled_special_text() -> None:
    from llmserve.engine.chunking import Cutter

    cutter = Cutter(["<a>", "\n", "\n\n"])
    text = ("x" * 50 + "\n\n" + "y" * 50 + "<a>") * 40
    pieces = cutter.pieces(text, size=100)
    assert "".join(pieces) == text and len(pieces) > 5
    for piece in pieces[1:]:
        assert piece.startswith(("<a>", "\n\n"))  # never between the two newlines


def test_limit_flags_reach_the_settings() -> None:
    from llmserve.cli import _settings, build_parser

    args = build_parser().parse_args([
        "serve", "--max_body_bytes", "1M", "--max-header-bytes", "16K", "--max_messages", "9",
        "--timeout_keep_alive", "2", "--timeout_headers", "3", "--timeout_body", "4",
        "--timeout_graceful_shutdown", "1", "--health_stall_seconds", "7",
    ])
    s = _settings(args)
    assert (s.max_body_bytes, s.max_header_bytes, s.max_messages) == (1 << 20, 16 << 10, 9)
    assert (s.timeout_keep_alive, s.timeout_headers, s.timeout_body) == (2, 3, 4)
    assert (s.timeout_graceful_shutdown, s.health_stall_seconds) == (1, 7)
