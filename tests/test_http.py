"""HTTP, streaming and error handling against the fake engine (no llama.cpp)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from llmserve.config import Settings
from llmserve.engine.fake import FakeEngine
from llmserve.http.app import create_app

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    # NOTE: context_length_exceeded adds llama-server's n_prompt_tokens and n_ctx
    assert set(body["error"]) - {"n_prompt_tokens", "n_ctx"} == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


async def test_chat_non_stream(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "alpha.gguf"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert usage["prompt_tokens"] > 0


async def test_legacy_route_and_text_parts(fake_client: Any) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    async with fake_client() as client:
        resp = await client.post("/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "Hello, world!"


async def test_stream_shape_and_usage(fake_client: Any) -> None:
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json=req)
        plain = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [r for r in reasons if r] == ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain.json()["choices"][0]["message"]["content"]


async def test_stream_without_usage_has_no_usage_chunk(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = sse_events(resp.text)[:-1]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_stop_sequence_across_tokens(fake_client: Any) -> None:
    async with fake_client(script=["ab", "c", "STO", "P", "never"]) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stop": ["STOP"]})
        streamed = await client.post(
            "/v1/chat/completions", json={**CHAT, "stop": "STOP", "stream": True}
        )
    assert resp.json()["choices"][0]["message"]["content"] == "abc"
    assert resp.json()["choices"][0]["finish_reason"] == "stop"
    chunks = sse_events(streamed.text)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "abc"


async def test_max_tokens_length_and_huge_is_clamped(fake_client: Any) -> None:
    async with fake_client(script=["a"] * 10) as client:
        short = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        huge = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**12})
        new_name = await client.post(
            "/v1/chat/completions", json={**CHAT, "max_completion_tokens": 2}
        )
    assert short.json()["choices"][0]["message"]["content"] == "aaa"
    assert short.json()["choices"][0]["finish_reason"] == "length"
    assert huge.status_code == 200
    assert huge.json()["choices"][0]["message"]["content"] == "a" * 10
    assert new_name.json()["usage"]["completion_tokens"] == 2


async def test_max_tokens_flag_limits_requests_that_set_none(fake_client: Any) -> None:
    async with fake_client({"max_tokens": 4}, script=["a"] * 10) as client:
        unset = await client.post("/v1/chat/completions", json=CHAT)
        own = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6})
        responses = await client.post("/v1/responses", json={"input": "hi"})
    assert unset.json()["choices"][0]["message"]["content"] == "aaaa"
    assert unset.json()["choices"][0]["finish_reason"] == "length"
    assert own.json()["choices"][0]["message"]["content"] == "a" * 6
    assert responses.json()["usage"]["output_tokens"] == 4
    assert responses.json()["status"] == "incomplete"


async def test_generation_stops_at_context_end(fake_client: Any) -> None:
    async with fake_client(n_ctx=200) as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "ignore_eos": True})
    body = resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_context_length_exceeded(fake_client: Any, stream: bool) -> None:
    long = {"messages": [{"role": "user", "content": "x" * 500}], "stream": stream}
    async with fake_client(n_ctx=100) as client:
        resp = await client.post("/v1/chat/completions", json=long)
        after = await client.post("/v1/chat/completions", json=CHAT)
    err = assert_error(resp, 400, "context_length_exceeded")
    assert "100" in err["message"]
    # llama-server's fields: a client can size its prompt from them
    assert err["n_ctx"] == 100 and err["n_prompt_tokens"] >= 100
    assert after.status_code == 200


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
         {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
    ],
    ids=["invalid-json", "invalid-utf8", "empty", "not-an-object"],
)
async def test_malformed_bodies(fake_client: Any, content: bytes, headers: dict[str, str]) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", content=content, headers=headers)
        after = await client.post("/v1/chat/completions", json=CHAT)
    assert_error(resp, 400)
    assert after.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "max_tokens": -5}, "max_tokens"),
        ({**CHAT, "max_tokens": "lots"}, "max_tokens"),
        ({**CHAT, "temperature": 9}, "temperature"),
        ({**CHAT, "n": 5}, "n"),  # more than --parallel (4)
    ],
)
async def test_validation_errors_are_400(fake_client: Any, body: Any, param: str) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json=body)
    err = assert_error(resp, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


async def test_unknown_route_and_method(fake_client: Any) -> None:
    async with fake_client() as client:
        missing = await client.get("/v1/nope")
        wrong = await client.get("/v1/chat/completions")
    assert_error(missing, 404)
    assert_error(wrong, 405)


async def test_models_routes(fake_client: Any) -> None:
    async with fake_client() as client:
        admin = (await client.get("/models")).json()
        openai = (await client.get("/v1/models")).json()
    assert admin["active"] == "alpha.gguf"
    present = [m for m in admin["models"] if m["present"]]
    assert {m["name"]: m["active"] for m in present} == {"alpha.gguf": True, "beta.gguf": False}
    assert all(m["size"] == 9 for m in present)
    assert admin["loaded"] == ["alpha.gguf"]
    assert openai["object"] == "list"
    assert [m["id"] for m in openai["data"]] == ["alpha.gguf", "beta.gguf"]


async def test_set_model_switches_and_rejects_bad_names(fake_client: Any) -> None:
    async with fake_client() as client:
        ok = await client.post("/setModel", json={"modelName": "beta"})
        active = (await client.get("/")).json()["model"]
        first = (await client.get("/v1/models")).json()["data"][0]["id"]
        unknown = await client.post("/setModel", json={"modelName": "gamma.gguf"})
        escape = await client.post("/setModel", json={"modelName": "../alpha.gguf"})
        still = (await client.get("/")).json()["model"]
        engines = client.engines
        closed = [e.closed for e in engines]
    assert ok.status_code == 200 and ok.json()["model"] == "beta.gguf"
    assert active == "beta.gguf" and first == "beta.gguf"
    assert_error(unknown, 404, "model_not_found")
    assert_error(escape, 400, "invalid_model_name")
    assert still == "beta.gguf"
    assert closed == [True, False]


async def test_request_model_field_switches(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "beta.gguf"})
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "zzz"})
        escape = await client.post("/v1/chat/completions", json={**CHAT, "model": "../../etc"})
    assert resp.json()["model"] == "beta.gguf"
    assert_error(unknown, 404, "model_not_found")
    assert_error(escape, 400, "invalid_model_name")


async def test_text_completions(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "Once", "temperature": 0})
        streamed = await client.post("/v1/completions", json={"prompt": "Once", "stream": True})
        missing = await client.post("/v1/completions", json={})
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello, world!"
    assert body["usage"]["prompt_tokens"] == 4
    chunks = sse_events(streamed.text)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello, world!"
    assert_error(missing, 400)


async def test_parallel_requests_run_on_one_thread(fake_client: Any) -> None:
    async with fake_client(token_delay=0.002) as client:
        results = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=CHAT) for _ in range(6))
        )
        engine = client.engines[0]
    assert all(r.json()["choices"][0]["message"]["content"] == "Hello, world!" for r in results)
    assert len(engine.thread_ids) == 1


async def test_health_answers_during_generation(fake_client: Any) -> None:
    async with fake_client(token_delay=0.01, script=["x"] * 300) as client:
        task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.2)
        health = await client.get("/health")
        status = (await client.get("/")).json()
        task.cancel()
    assert health.status_code == 200
    assert status["queued"] >= 1


async def test_health_503_while_loading(fake_models_dir: Any, tmp_path: Any) -> None:
    import threading

    from llmserve.config import Settings
    from llmserve.engine.fake import FakeEngine
    from llmserve.http.app import create_app

    gate = threading.Event()

    def slow_factory(path: Any, settings: Any) -> FakeEngine:
        gate.wait(5)
        return FakeEngine(path)

    settings = Settings(model_name="alpha.gguf", models_dir=fake_models_dir)
    app = create_app(settings, engine_factory=slow_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            loading = await client.get("/health")
            gate.set()
            ok = await client.post("/v1/chat/completions", json=CHAT)
            ready = await client.get("/health")
    assert loading.status_code == 503
    assert loading.json()["error"]["type"] == "service_unavailable"
    assert ok.status_code == 200
    assert ready.status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/responses", "/tokenize", "/chat", "/setModel"])
async def test_empty_and_non_object_bodies_are_400s_saying_so(fake_client: Any, path: str) -> None:
    async with fake_client() as client:
        sent = {body: await client.post(path, content=body,
                                        headers={"Content-Type": "application/json"})
                for body in (b"", b"[]", b"3", b"null", b'"x"')}
    assert assert_error(sent[b""], 400)["message"] == (
        "the request body is empty: it must be a JSON object")
    for body in (b"[]", b"3", b"null", b'"x"'):
        error = assert_error(sent[body], 400)
        assert error["message"] == "the request body must be a JSON object", body
        assert error["param"] is None


async def test_anthropic_empty_and_non_object_bodies(fake_client: Any) -> None:
    async with fake_client() as client:
        empty = await client.post("/v1/messages", content=b"")
        listed = await client.post("/v1/messages", json=[])
    assert empty.status_code == listed.status_code == 400
    assert "empty" in empty.json()["error"]["message"]
    assert listed.json()["error"]["message"] == "the request body must be a JSON object"


def test_openapi_lists_error_responses_with_the_error_schema() -> None:
    app = create_app(Settings(no_announce=True), engine_factory=lambda p, s: FakeEngine(p))
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "503"} <= set(chat)
    for status in ("400", "401", "413", "503"):
        ref = chat[status]["content"]["application/json"]["schema"]["$ref"]
        body = schemas[ref.rsplit("/", 1)[1]]
        inner = schemas[body["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
        assert set(inner["properties"]) == set(inner["required"]) == {
            "message", "type", "param", "code"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "422" not in codes, (method, path)  # validation errors are 400s here
            if path not in ("/", "/health"):
                assert "401" in codes, (method, path)
    assert "413" not in doc["paths"]["/v1/responses/{response_id}"]["get"]["responses"]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
