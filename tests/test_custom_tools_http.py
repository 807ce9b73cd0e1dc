"""Custom, namespace and hosted tools over HTTP against the scripted fake engine (chat
completions and Responses, JSON and streamed), the captured Codex CLI bodies accepted, and a
context overflow found after a stream started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from llmserve.engine.fake import FakeEngine
from llmserve.errors import ContextLengthError
from tests.test_http import sse_events
from tests.test_responses_http import check_stream, parse_sse

pytestmark = pytest.mark.anyio

FAST = {"stream_interval_ms": 0}
PATCH = '*** Begin Patch\n*** Add File: "note".txt\n+hi\n*** End Patch\n'
LARK = {"type": "grammar", "syntax": "lark",
        "definition": 'start: "*** Begin Patch" LF\n%import common.LF'}
# A Hermes-style call of the freeform function, cut inside escapes and the opening.
CUSTOM_SCRIPT = ["<tool_call>\n{\"name\": \"apply_patch\", \"arguments\": {\"in", "put\": \"",
                 "*** Begin Patch\\", "n*** Add File: \\\"no", "te\\\".txt\\n+hi\\n*** End",
                 " Patch\\n\"}}\n</tool_call>"]
CHAT_PATCH = {"type": "custom", "custom": {"name": "apply_patch",
                                           "description": "Edit files.", "format": LARK}}
ASK = {"messages": [{"role": "user", "content": "Add note.txt"}], "tools": [CHAT_PATCH]}
RESPONSES_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
                   "format": LARK}
AGENTS = Path(__file__).parent / "fixtures" / "agents"


async def test_chat_custom_tool_call_json_and_stream(fake_client: Any) -> None:
    async with fake_client(FAST, script=CUSTOM_SCRIPT) as client:
        plain = await client.post("/v1/chat/completions", json=ASK)
        prompt = client.engines[0].prompts[-1]
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    assert plain.status_code == 200, plain.text
    completion = ChatCompletion.model_validate(plain.json())
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "custom" and call.id.startswith("call_")
    assert call.custom.name == "apply_patch" and call.custom.input == PATCH
    assert completion.choices[0].finish_reason == "tool_calls"
    assert "freeform text" in prompt and "lark grammar" in prompt  # the function offered
    chunks = sse_events(resp.text)[:-1]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    first, *rest = calls
    assert first["type"] == "custom" and first["custom"]["name"] == "apply_patch"
    assert first["id"].startswith("call_") and "function" not in first
    assert len(rest) > 2 and all(set(c) == {"index", "custom"} for c in rest)
    assert "".join(c["custom"]["input"] for c in calls) == PATCH
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_chat_history_with_a_custom_call_renders_like_the_models_call(
    fake_client: Any
) -> None:
    async with fake_client(script=CUSTOM_SCRIPT) as client:
        first = (await client.post("/v1/chat/completions", json=ASK)).json()
        engine = client.engines[0]
        engine.script = ["Done."]
        reply = first["choices"][0]["message"]
        resp = await client.post("/v1/chat/completions", json={**ASK, "messages": [
            *ASK["messages"], reply,
            {"role": "tool", "tool_call_id": reply["tool_calls"][0]["id"], "content": "ok"}]})
        prompt = engine.prompts[-1]
    assert resp.status_code == 200, resp.text
    assert json.dumps({"name": "apply_patch", "arguments": {"input": PATCH}}) in prompt


async def test_responses_custom_tool_call_json_and_stream(fake_client: Any) -> None:
    body = {"input": "Add note.txt", "tools": [RESPONSES_PATCH, {"type": "web_search"}]}
    async with fake_client(FAST, script=CUSTOM_SCRIPT) as client:
        plain = await client.post("/v1/responses", json=body)
        prompt = client.engines[0].prompts[-1]
        resp = await client.post("/v1/responses", json={**body, "stream": True})
    assert plain.status_code == 200, plain.text
    events = parse_sse(resp.text)
    final = check_stream(events)
    for response in (Response.model_validate(plain.json()), final):
        [call] = response.output
        assert call.type == "custom_tool_call" and call.name == "apply_patch"
        assert call.input == PATCH and call.call_id.startswith("call_")
        assert call.id is not None and call.id.startswith("ctc_")
    assert plain.json()["output"][0]["status"] == "completed"
    assert "web_search" not in prompt  # hosted: accepted, not offered
    assert "apply_patch" in prompt and "freeform text" in prompt
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 2 and "".join(e["delta"] for e in deltas) == PATCH
    [done] = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert done["input"] == PATCH and done["item_id"] == final.output[0].id
    assert kinds[2] == "response.output_item.added"
    assert events[2]["item"]["type"] == "custom_tool_call" and events[2]["item"]["input"] == ""
    assert kinds[-3:] == ["response.custom_tool_call_input.done",
                          "response.output_item.done", "response.completed"]
    assert "response.function_call_arguments.delta" not in kinds
    assert plain.json()["tools"] == body["tools"]


async def test_responses_custom_call_round_trips(fake_client: Any) -> None:
    """The call item and its output, sent back, render as the model's own call and a result,
    with or without the store."""
    async with fake_client(script=CUSTOM_SCRIPT) as client:
        tools = [RESPONSES_PATCH]
        first = (await client.post("/v1/responses", json={
            "input": "Add note.txt", "tools": tools})).json()
        engine = client.engines[0]
        p1 = engine.prompts[-1]
        engine.script = ["Added."]
        call = first["output"][0]
        output = {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "ok"}
        stored = await client.post("/v1/responses", json={
            "previous_response_id": first["id"], "tools": tools, "input": [output]})
        p2 = engine.prompts[-1]
        manual = await client.post("/v1/responses", json={"tools": tools, "store": False,
            "input": [{"role": "user", "content": "Add note.txt"}, call, output]})
        p3 = engine.prompts[-1]
    assert stored.status_code == 200 and manual.status_code == 200, manual.text
    assert p2 == p3 and p2.startswith(p1)
    assert json.dumps({"name": "apply_patch", "arguments": {"input": PATCH}}) in p2


NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
             "tools": [{"type": "function", "name": "spawn_agent", "parameters": {
                 "type": "object", "properties": {"task": {"type": "string"}}}}]}
SPAWN_SCRIPT = ['<tool_call>\n{"name": "multi_agent_v1__spawn_agent", "arguments": ',
                '{"task": "x"}}\n</tool_call>']


async def test_namespace_call_names_its_namespace(fake_client: Any) -> None:
    tools = [{"type": "function", "name": "spawn_agent"}, NAMESPACE]  # the same inner name
    async with fake_client(FAST, script=SPAWN_SCRIPT) as client:
        plain = (await client.post("/v1/responses", json={"input": "go", "tools": tools}))
        prompt = client.engines[0].prompts[-1]
        resp = await client.post("/v1/responses", json={
            "input": "go", "tools": tools, "stream": True})
        engine = client.engines[0]
        engine.script = ["Spawned."]
        call = plain.json()["output"][0]
        follow = await client.post("/v1/responses", json={"tools": tools, "store": False,
            "input": [{"role": "user", "content": "go"}, call,
                      {"type": "function_call_output", "call_id": call["call_id"],
                       "output": "agent-1"}]})
        follow_prompt = engine.prompts[-1]
    assert plain.status_code == 200, plain.text
    final = check_stream(parse_sse(resp.text))
    for response in (Response.model_validate(plain.json()), final):
        [item] = response.output
        assert item.type == "function_call"
        assert (item.name, item.namespace) == ("spawn_agent", "multi_agent_v1")
        assert json.loads(item.arguments) == {"task": "x"}
    assert '"name": "multi_agent_v1__spawn_agent"' in prompt
    assert '"name": "spawn_agent"' in prompt
    assert follow.status_code == 200, follow.text
    assert follow_prompt.startswith(prompt)
    assert '{"name": "multi_agent_v1__spawn_agent", "arguments": {"task": "x"}}' in follow_prompt


@pytest.mark.parametrize("name", ["codex_exec_1", "codex_exec_2", "codex_exec_json_1",
                                  "codex_exec_json_2"])
async def test_codex_bodies_are_accepted(fake_client: Any, name: str) -> None:
    body = json.loads((AGENTS / f"{name}.json").read_text())["body"]
    body.pop("model")
    async with fake_client(FAST, script=["Hi"], n_ctx=200_000) as client:
        resp = await client.post("/v1/responses", json=body)
        prompt = client.engines[0].prompts[-1]
    assert resp.status_code == 200, resp.text
    final = check_stream(parse_sse(resp.text))
    assert final.status == "completed" and final.output_text == "Hi"
    assert "web_search" not in prompt and '"tool_search"' not in prompt
    if name.startswith("codex_exec_json"):
        assert '"name": "apply_patch"' in prompt
    else:
        assert '"name": "multi_agent_v1__spawn_agent"' in prompt
    if name.endswith("_2"):
        assert "<tool_response>" in prompt


def _overflow(self: FakeEngine, params: Any, gen: int) -> Any:
    yield 1, b"Hel"
    raise ContextLengthError(600, 512)


async def test_overflow_after_the_stream_started_keeps_its_code(
    fake_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeEngine, "_replay", _overflow)
    async with fake_client(FAST) as client:
        chat = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "stream": True})
        resp = await client.post("/v1/responses", json={"input": "x", "stream": True})
        plain = await client.post("/v1/responses", json={"input": "x"})
    *_, error, done = sse_events(chat.text)
    assert done == "[DONE]"
    assert error["error"]["code"] == "context_length_exceeded"
    assert (error["error"]["n_prompt_tokens"], error["error"]["n_ctx"]) == (600, 512)
    assert "maximum context length is 512 tokens" in error["error"]["message"]
    events = parse_sse(resp.text)
    # NOTE: the SDK's ResponseError.code Literal lacks context_length_exceeded (what OpenAI
    # sends and Codex reads); its stream parser does not validate, so only that field differs.
    failed = events[-1]["response"]
    check_stream([*events[:-1], {**events[-1], "response": {
        **failed, "error": {**failed["error"], "code": "server_error"}}}])
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "context_length_exceeded"
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in failed["error"]["message"]
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == "context_length_exceeded"
