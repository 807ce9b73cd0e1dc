"""Tools over HTTP against the scripted fake engine: wire shapes, tool_choice, 400s."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_http import CHAT, assert_error, sse_events

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
ASK = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, ADD],
       "temperature": 0}
# A Hermes-style reply cut at awkward places: inside the tags, the name, the arguments.
CALL_SCRIPT = ["Let me look.\n<tool", "_call>\n{\"na", "me\": \"get_wea", "ther\", \"argu",
               "ments\": {\"ci", "ty\": \"Par", "is\"}}\n</tool_", "call>"]
FAST = {"stream_interval_ms": 0}


async def test_tool_call_non_stream(fake_client: Any) -> None:
    async with fake_client(script=CALL_SCRIPT) as client:
        resp = await client.post("/v1/chat/completions", json=ASK)
        prompt = client.engines[0].prompts[-1]
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me look."
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the fake model's ChatML template ignores tools: templates/chatml.jinja renders them
    assert "<tools>" in prompt and '"name": "add"' in prompt


async def test_tool_call_stream_follows_openai(fake_client: Any) -> None:
    async with fake_client(FAST, script=CALL_SCRIPT) as client:
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    chunks = sse_events(resp.text)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me look."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    first, *rest = calls
    assert set(first) == {"index", "id", "type", "function"}
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert len(rest) > 2
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
               for tc in rest)
    assert {tc["index"] for tc in calls} == {0}
    assert json.loads("".join(tc["function"]["arguments"] for tc in rest)) == {"city": "Paris"}
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert reasons == ["tool_calls"]


async def test_no_call_is_plain_content(fake_client: Any) -> None:
    async with fake_client(script=["It is ", "sunny."]) as client:
        resp = await client.post("/v1/chat/completions", json=ASK)
    choice = resp.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


async def test_tool_choice_sets_prompt_and_grammar(fake_client: Any) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    async with fake_client(script=CALL_SCRIPT) as client:
        none = await client.post("/v1/chat/completions", json={**ASK, "tool_choice": "none"})
        for choice in ("auto", "required", named):
            ok = await client.post("/v1/chat/completions", json={**ASK, "tool_choice": choice})
            assert ok.status_code == 200
        engine = client.engines[0]
    # none: no tools in the prompt, no parsing (the markup is just text)
    assert "<tools>" not in engine.prompts[0]
    assert "<tool_call>" in none.json()["choices"][0]["message"]["content"]
    auto, required, forced = (p.grammar for p in engine.params[1:])
    # auto: a lazy grammar, free text until the family's trigger
    assert auto is not None and "[lazy]" in auto and "<tool_call>" in auto
    assert required is not None and "get_weather" in required and '"add' in required
    assert "[lazy]" not in required and "<tool_call>" in required
    assert forced is not None and "get_weather" not in forced and '"add' in forced


async def test_response_format_and_raw_grammar(fake_client: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    async with fake_client(script=['{"n": 1}']) as client:
        for body in (
            {**CHAT, "response_format": fmt},
            {**CHAT, "response_format": {"type": "json_object"}},
            {**CHAT, "response_format": {"type": "text"}},
            {**CHAT, "grammar": 'root ::= "yes" | "no"'},
            {**ASK, "response_format": fmt},
        ):
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
        text = await client.post("/v1/completions", json={"prompt": "x", "grammar": 'root ::= "a"'})
        assert text.status_code == 200
        grammars = [p.grammar for p in client.engines[0].params]
    schema_g, object_g, text_g, raw_g, union_g, completion_g = grammars
    assert schema_g is not None and '"n": {"type": "integer"}' in schema_g
    assert object_g is not None and '%json {"type": "object"' in object_g
    assert text_g is None
    assert raw_g is not None and '"yes"' in raw_g and '"no"' in raw_g
    assert union_g is not None and union_g.startswith("start: content | first_call")
    assert completion_g is not None and '"a"' in completion_g


BAD = "/v1/chat/completions"


@pytest.mark.parametrize(("body", "param"), [
    ({**ASK, "tools": [{"type": "function"}]}, "tools.0.function"),
    ({**ASK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ({**ASK, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({**ASK, "tools": [WEATHER, WEATHER]}, "tools"),
    ({**ASK, "tools": "get_weather"}, "tools"),
    ({**ASK, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({**ASK, "tool_choice": "sometimes"}, "tool_choice"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice"),
    ({**ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strng"}}}}}]},
     "tools.0.function.parameters"),
    ({**ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/nowhere"}}}}, "response_format.json_schema"),
    ({**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ({**CHAT, "grammar": 'root ::= "unterminated'}, "grammar"),
    ({**CHAT, "grammar": 'root ::= "a"{5,3}'}, "grammar"),
    ({**CHAT, "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42",
                                                       "tool_call_id": "call_1"}]},
     "messages.1"),
    ({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_2"}]},
     "messages.2.tool_call_id"),
    ({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
async def test_bad_tool_input_is_400(fake_client: Any, body: Any, param: str) -> None:
    async with fake_client() as client:
        resp = await client.post(BAD, json=body)
        also_stream = await client.post(BAD, json={**body, "stream": True})
        after = await client.post(BAD, json=CHAT)
    err = assert_error(resp, 400)
    assert err["param"] == param
    assert_error(also_stream, 400)
    assert after.status_code == 200


async def test_invalid_grammar_on_completions_is_400(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/completions", json={"prompt": "x", "grammar": "root ::= ("})
    assert_error(resp, 400, "invalid_grammar")


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "21 C."},
    {"role": "assistant", "content": "Anything else?"},
    {"role": "user", "content": "Thanks"},
]


async def test_history_round_trips_and_apply_template(fake_client: Any) -> None:
    body = {"messages": HISTORY, "tools": [WEATHER]}
    async with fake_client() as client:
        applied = await client.post("/apply-template", json=body)
        v1 = await client.post("/v1/apply-template", json=body)
        chat = await client.post("/v1/chat/completions", json=body)
    assert applied.status_code == 200, applied.text
    out = applied.json()
    assert v1.json()["prompt"] == out["prompt"]
    prompt = out["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in prompt
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in prompt
    assert prompt.count("<|im_start|>assistant") == 4  # both consecutive assistant turns
    assert out["tokens"] == chat.json()["usage"]["prompt_tokens"]
    assert out["template"].endswith("chatml.jinja")
    assert out["tool_call_format"] == "hermes"
