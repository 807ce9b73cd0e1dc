"""Anthropic Messages on the fake engine: conversion, errors, stream events, tools, tokens."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from tests.conftest import FakeFactory

pytestmark = pytest.mark.anyio

HEADERS = {"anthropic-version": "2023-06-01"}
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)


def body(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "alpha.gguf", "max_tokens": 64,
                           "messages": [{"role": "user", "content": "Hi"}]}
    out.update(kw)
    return out


async def post(client: httpx.AsyncClient, payload: dict[str, Any], path: str = "/v1/messages",
               **kw: Any) -> httpx.Response:
    return await client.post(path, json=payload, headers={**HEADERS, **kw.pop("headers", {})},
                             **kw)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an SSE body, comments skipped."""
    out = []
    for chunk in text.replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in chunk.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        name = next(ln[len("event: "):] for ln in lines if ln.startswith("event: "))
        data = "".join(ln[len("data: "):] for ln in lines if ln.startswith("data: "))
        out.append((name, json.loads(data)))
    return out


async def test_create_message_shape(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        r = await post(client, body())
        assert r.status_code == 200, r.text
        msg = Message.model_validate(r.json())
        assert msg.id.startswith("msg_")
        assert msg.type == "message" and msg.role == "assistant"
        assert msg.model == "alpha.gguf"
        assert [b.type for b in msg.content] == ["text"]
        assert msg.content[0].text == "Hello, world!"
        assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
        assert msg.usage.output_tokens == 4
        prompt = client.engines[0].prompts[-1]
        total = (msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
                 + (msg.usage.cache_creation_input_tokens or 0))
        assert total == len(prompt)


def assert_error(r: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert data["error"]["type"] == kind
    for word in words:
        assert word in data["error"]["message"]


@pytest.mark.parametrize(("payload", "words"), [
    ({"model": "alpha.gguf", "messages": [{"role": "user", "content": "Hi"}]}, ["max_tokens"]),
    (body(max_tokens=0), ["max_tokens"]),
    (body(messages=[]), ["messages"]),
    (body(messages=[{"role": "robot", "content": "x"}]), ["role"]),
    (body(messages=[{"role": "system", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]),
     ["system messages take text blocks only"]),
    (body(messages=[{"role": "user", "content": 7}]), ["messages.0.content"]),
    (body(temperature=1.5), ["temperature"]),
    (body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x"}}]}]), ["messages"]),
    (body(tool_choice={"type": "tool", "name": "nope"},
          tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]), ["nope"]),
    (body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]), ["toolu_x"]),
])
async def test_invalid_requests_get_anthropic_errors(
    fake_client: FakeFactory, payload: dict[str, Any], words: list[str]
) -> None:
    async with fake_client() as client:
        assert_error(await post(client, payload), 400, "invalid_request_error", *words)


async def test_bad_json_unknown_model_and_openai_routes_keep_their_shape(
    fake_client: FakeFactory
) -> None:
    async with fake_client() as client:
        r = await client.post("/v1/messages", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_request_error", "JSON")
        assert_error(await post(client, body(model="missing.gguf")), 404, "not_found_error",
                     "missing.gguf")
        assert_error(await post(client, body(model="missing.gguf"),
                                "/v1/messages/count_tokens"), 404, "not_found_error")
        r = await client.post("/v1/chat/completions", json={"model": "alpha.gguf"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


async def test_conversion_of_system_tools_and_results(fake_client: FakeFactory) -> None:
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "secret plan", "signature": "s"},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "service down"}]},
            {"type": "text", "text": "Try again?"}]},
    ]
    system = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    async with fake_client() as client:
        r = await post(client, body(system=system, messages=messages, tools=tools))
        assert r.status_code == 200, r.text
        prompt = client.engines[0].prompts[-1]
    assert prompt.startswith("<|im_start|>system\nBe brief.\nBe kind.")
    assert "<|im_start|>user\nWeather\nin Paris?<|im_end|>" in prompt
    assert '"name": "get_weather"' in prompt  # the tool listing (templates/chatml.jinja)
    assert "Looking." in prompt and '"city": "Paris"' in prompt
    assert "secret plan" not in prompt
    assert "Error: service down" in prompt
    assert prompt.index("Error: service down") < prompt.index("Try again?")
    assert prompt.endswith("<|im_start|>assistant\n")


async def test_sampling_stops_and_metadata_reach_the_engine(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        r = await post(client, body(temperature=0.25, top_p=0.5, top_k=7,
                                    stop_sequences=[" world", "zzz"],
                                    metadata={"user_id": "u1"}))
        params = client.engines[0].params[-1]
    assert (params.temperature, params.top_p, params.top_k) == (0.25, 0.5, 7)
    msg = Message.model_validate(r.json())
    assert msg.content[0].text == "Hello,"
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", " world")


async def test_max_tokens_stop_reason(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        msg = Message.model_validate((await post(client, body(max_tokens=2))).json())
    assert msg.content[0].text == "Hello,"
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 2


async def test_prefill_continues_the_assistant_turn(fake_client: FakeFactory) -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Sure: "}]
    async with fake_client() as client:
        r = await post(client, body(messages=messages))
        prompt = client.engines[0].prompts[-1]
        count = (await post(client, body(messages=messages), "/v1/messages/count_tokens"))
    assert prompt.endswith("<|im_start|>assistant\nSure:")
    assert Message.model_validate(r.json()).content[0].text == "Hello, world!"
    assert count.json() == {"input_tokens": len(prompt)}


async def test_count_tokens_matches_the_rendered_prompt(fake_client: FakeFactory) -> None:
    payload = body(system="You are terse.", messages=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "text", "text": "three"}]}])
    async with fake_client() as client:
        await post(client, payload)
        prompt = client.engines[0].prompts[-1]
        counted = {k: v for k, v in payload.items() if k != "max_tokens"}
        r = await post(client, counted, "/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    assert MessageTokensCount.model_validate(r.json()).input_tokens == len(prompt)
    assert "You are terse." in prompt


async def test_stream_event_order_and_text(fake_client: FakeFactory) -> None:
    async with fake_client({"stream_interval_ms": 0}) as client:
        r = await post(client, body(stream=True))
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            STREAM_EVENT.validate_python(data)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["id"].startswith("msg_")
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello, world!"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 4


class Boom:
    def encode(self) -> bytes:
        raise RuntimeError("engine exploded")


async def test_error_after_the_stream_started_is_an_error_event(
    fake_client: FakeFactory
) -> None:
    async with fake_client({"stream_interval_ms": 0}, script=["Hello", Boom()]) as client:
        r = await post(client, body(stream=True))
    events = sse_events(r.text)
    assert events[0][0] == "message_start"
    name, data = events[-1]
    assert name == "error"
    assert data["type"] == "error" and data["error"]["type"] == "api_error"
    assert "engine exploded" in data["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]


WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
CALL_SCRIPT = ["Let me look.\n<tool", "_call>\n{\"na", "me\": \"get_wea", "ther\", \"argu",
               "ments\": {\"ci", "ty\": \"Par", "is\"}}\n</tool_", "call>"]


async def test_tool_use_block_and_stop_reason(fake_client: FakeFactory) -> None:
    async with fake_client(script=CALL_SCRIPT) as client:
        r = await post(client, body(tools=[WEATHER]))
    msg = Message.model_validate(r.json())
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Let me look."
    call = msg.content[1]
    assert call.type == "tool_use"
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert call.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"


async def test_tool_use_stream(fake_client: FakeFactory) -> None:
    async with fake_client({"stream_interval_ms": 0}, script=CALL_SCRIPT) as client:
        r = await post(client, body(tools=[WEATHER], stream=True))
    events = sse_events(r.text)
    for name, data in events:
        if name != "ping":
            STREAM_EVENT.validate_python(data)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [s["type"] for s in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "get_weather" and starts[1]["input"] == {}
    assert starts[1]["id"].startswith("toolu_")
    pieces = [d["delta"]["partial_json"] for n, d in events
              if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert {d["index"] for n, d in events if n == "content_block_delta"
            and d["delta"]["type"] == "input_json_delta"} == {1}
    assert [n for n, _ in events].count("content_block_stop") == 2
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("choice", "forced", "rendered"), [
    ({"type": "auto"}, False, True),
    ({"type": "any"}, True, True),
    ({"type": "tool", "name": "get_weather"}, True, True),
    ({"type": "none"}, False, False),
])
async def test_tool_choice(fake_client: FakeFactory, choice: dict[str, Any], forced: bool,
                           rendered: bool) -> None:
    async with fake_client() as client:
        r = await post(client, body(tools=[WEATHER], tool_choice=choice))
        assert r.status_code == 200, r.text
        params = client.engines[0].params[-1]
        prompt = client.engines[0].prompts[-1]
    # NOTE: auto is a lazy grammar (free text until the call's trigger), forced is not
    assert (params.grammar is not None and "[lazy]" not in params.grammar) == forced
    assert (params.grammar is not None) == rendered
    assert ("get_weather" in prompt) == rendered


async def test_disable_parallel_tool_use_allows_one_call(fake_client: FakeFactory) -> None:
    async with fake_client() as client:
        await post(client, body(tools=[WEATHER], tool_choice={"type": "any"}))
        several = client.engines[0].params[-1].grammar
        await post(client, body(tools=[WEATHER], tool_choice={
            "type": "any", "disable_parallel_tool_use": True}))
        one = client.engines[0].params[-1].grammar
    assert several and one and several != one


async def test_too_many_cache_breakpoints(fake_client: FakeFactory) -> None:
    mark = {"type": "ephemeral"}
    system = [{"type": "text", "text": f"rule {i}", "cache_control": mark} for i in range(5)]
    async with fake_client() as client:
        assert_error(await post(client, body(system=system)), 400, "invalid_request_error",
                     "maximum of 4")
        system[0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
        r = await post(client, body(system=system[:4]))
        assert r.status_code == 200, r.text


async def test_x_api_key_and_bearer(fake_client: FakeFactory) -> None:
    async with fake_client({"api_key": ["sekrit"]}) as client:
        assert_error(await post(client, body()), 401, "authentication_error", "missing")
        assert_error(await post(client, body(), headers={"x-api-key": "nope"}), 401,
                     "authentication_error", "invalid")
        ok = await post(client, body(), headers={"x-api-key": "sekrit"})
        assert ok.status_code == 200, ok.text
        ok = await post(client, body(), headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200, ok.text
        r = await post(client, body(), "/v1/messages/count_tokens")
        assert_error(r, 401, "authentication_error")
        r = await client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "type" not in r.json()


async def test_output_config_format_constrains_the_output(fake_client: FakeFactory) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with fake_client(script=['{"n": 1}']) as client:
        r = await post(client, body(output_config={
            "format": {"type": "json_schema", "schema": schema}, "effort": "low"}))
        grammar = client.engines[0].params[-1].grammar
        bad = await post(client, body(output_config={
            "format": {"type": "json_schema", "schema": {"type": "bogus"}}}))
    assert r.status_code == 200, r.text
    assert grammar is not None
    assert Message.model_validate(r.json()).content[0].text == '{"n": 1}'
    assert_error(bad, 400, "invalid_request_error")
