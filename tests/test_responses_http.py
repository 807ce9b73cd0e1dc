"""POST /v1/responses and the stored-response routes against the scripted fake engine:
wire shapes (checked with the openai SDK's own types), stream event order, 400s, the store."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent

from llmserve.engine.fake import FakeEngine
from tests.test_http import assert_error
from tests.test_tools_http import CALL_SCRIPT

pytestmark = pytest.mark.anyio

FAST = {"stream_interval_ms": 0}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
EVENTS: Any = pydantic.TypeAdapter(ResponseStreamEvent)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Every `data:` payload; each one's `event:` line must name its type."""
    out: list[dict[str, Any]] = []
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("event:"):
            names.append(line[len("event:"):].strip())
        elif line.startswith("data:"):
            out.append(json.loads(line[len("data:"):].strip()))
    assert names == [e["type"] for e in out]
    return out


def check_stream(events: list[dict[str, Any]]) -> Response:
    """The SDK parses every event; sequence numbers count up from 0; returns the final one."""
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.in_progress"
    return Response.model_validate(events[-1]["response"])


async def test_create_non_stream(fake_client: Any) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/responses", json={
            "input": "Say hello", "instructions": "Be brief.", "metadata": {"k": "v"},
            "temperature": 0.5, "top_p": 0.9,
        })
        engine = client.engines[0]
        prompt, params = engine.prompts[-1], engine.params[-1]
    assert resp.status_code == 200, resp.text
    body = Response.model_validate(resp.json())
    assert body.id.startswith("resp_") and body.object == "response"
    assert body.status == "completed" and body.model == "alpha.gguf"
    assert body.output_text == "Hello, world!"
    [message] = body.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert body.instructions == "Be brief." and body.metadata == {"k": "v"}
    assert body.usage is not None
    assert body.usage.output_tokens == 4
    assert body.usage.input_tokens == len(prompt)
    assert body.usage.total_tokens == body.usage.input_tokens + 4
    assert body.usage.output_tokens_details.reasoning_tokens == 0
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello")
    assert (params.temperature, params.top_p) == (0.5, 0.9)


async def test_input_items_render_in_order(fake_client: Any) -> None:
    items = [
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "part one, "}, {"type": "input_text", "text": "two"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "an answer", "annotations": []}]},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "last"},
    ]
    async with fake_client() as client:
        resp = await client.post("/v1/responses", json={"input": items})
        prompt = client.engines[0].prompts[-1]
    assert resp.status_code == 200, resp.text
    assert prompt == (
        "<|im_start|>system\ndev rules<|im_end|>\n<|im_start|>user\npart one, two<|im_end|>\n"
        "<|im_start|>assistant\nan answer<|im_end|>\n<|im_start|>system\nsys<|im_end|>\n"
        "<|im_start|>user\nlast<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_stream_event_order(fake_client: Any) -> None:
    async with fake_client(FAST) as client:
        resp = await client.post("/v1/responses", json={"input": "hi", "stream": True})
        events = parse_sse(resp.text)
        final = check_stream(events)
        stored = (await client.get(f"/v1/responses/{final.id}")).json()
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 4,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Hello, world!" == final.output_text
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == deltas
    assert final.status == "completed" and final.usage is not None
    assert stored == events[-1]["response"]


async def test_tool_call_stream_and_json(fake_client: Any) -> None:
    body = {"input": "Weather in Paris?", "tools": [WEATHER], "temperature": 0}
    async with fake_client(FAST, script=CALL_SCRIPT) as client:
        plain = (await client.post("/v1/responses", json=body)).json()
        resp = await client.post("/v1/responses", json={**body, "stream": True})
        prompt = client.engines[0].prompts[-1]
    events = parse_sse(resp.text)
    final = check_stream(events)
    for response in (Response.model_validate(plain), final):
        message, call = response.output
        assert message.type == "message" and response.output_text == "Let me look."
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
        assert json.loads(call.arguments) == {"city": "Paris"}
        assert call.status == "completed"
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_item.done") < kinds.index(
        "response.function_call_arguments.delta")
    args = "".join(e["delta"] for e in events
                   if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == args and done["output_index"] == 1
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert events[-2]["item"]["type"] == "function_call"
    assert '"name": "get_weather"' in prompt  # rendered as a chat tool


async def test_function_call_output_round_trip(fake_client: Any) -> None:
    async with fake_client(script=CALL_SCRIPT) as client:
        first = (await client.post("/v1/responses", json={
            "input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required"})).json()
        call = first["output"][-1]
        engine = client.engines[0]
        engine.script = ["It is sunny."]
        second = await client.post("/v1/responses", json={
            "previous_response_id": first["id"], "tools": [WEATHER],
            "input": [{"type": "function_call_output", "call_id": call["call_id"],
                       "output": '{"sky": "sunny"}'}]})
        prompt = engine.prompts[-1]
        # the same conversation sent in full, without the store
        history = [{"role": "user", "content": "Weather in Paris?"}, *first["output"],
                   {"type": "function_call_output", "call_id": call["call_id"],
                    "output": '{"sky": "sunny"}'}]
        manual = await client.post("/v1/responses", json={
            "input": history, "tools": [WEATHER], "store": False})
        manual_prompt = engine.prompts[-1]
    assert first["tool_choice"] == "required"
    assert second.status_code == 200, second.text
    assert second.json()["output"][0]["content"][0]["text"] == "It is sunny."
    assert '{"sky": "sunny"}' in prompt and "<tool_call>" in prompt
    assert manual.status_code == 200 and manual_prompt == prompt


async def test_second_turn_prompt_extends_the_first(fake_client: Any) -> None:
    """What makes the prefix cache hit: turn 2's prompt = turn 1's prompt + its output + more."""
    async with fake_client() as client:
        first = (await client.post("/v1/responses", json={"input": "one"})).json()
        second = (await client.post("/v1/responses", json={
            "input": "two", "previous_response_id": first["id"]})).json()
        p1, p2 = client.engines[0].prompts
        items = (await client.get(f"/v1/responses/{second['id']}/input_items",
                                  params={"order": "asc"})).json()
    assert p2.startswith(p1 + "Hello, world!")
    assert p2.endswith("<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n")
    assert second["previous_response_id"] == first["id"]
    listing = ResponseItemList.model_validate(items)
    assert [i.type for i in listing.data] == ["message", "message", "message"]
    assert [getattr(i, "role", None) for i in listing.data] == ["user", "assistant", "user"]


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"input": "x", "tools": [{"type": "retrieval"}]}, "tools.0.type", "retrieval"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [
        {"type": "web_search"}]}]}, "tools.0.tools.0.type", "web_search"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [
        {"type": "function", "name": "f"}, {"type": "function", "name": "f"}]}]}, "tools", "f"),
    ({"input": "x", "tools": [{"type": "custom", "name": "bad name!"}]}, "tools.0.name",
     "name"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name",
     "name"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input.0.content.0.type", "input_image"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "role"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
     "input.0.call_id", "c1"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
     "input.0.arguments", "JSON"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}},
     "tool_choice", "allowed_tools"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice", "nope"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type", "yaml"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema", "schema"),
    ({"input": "x", "background": True}, "background", "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"instructions": "x"}, "input", "input"),
    ({"input": []}, "input", "input"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata", "512"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
])
async def test_bad_requests_are_400s(
    fake_client: Any, body: dict[str, Any], param: str, needle: str
) -> None:
    async with fake_client() as client:
        resp = await client.post("/v1/responses", json=body)
    error = assert_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert needle in error["message"]


async def test_text_format_uses_grammars(fake_client: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with fake_client(script=['{"a": 1}']) as client:
        plain = await client.post("/v1/responses", json={"input": "x"})
        obj = await client.post("/v1/responses", json={
            "input": "x", "text": {"format": {"type": "json_object"}}})
        typed = await client.post("/v1/responses", json={
            "input": "x", "text": {"format": {"type": "json_schema", "name": "thing",
                                              "schema": schema, "strict": True}}})
        grammars = [p.grammar for p in client.engines[0].params]
    assert [r.status_code for r in (plain, obj, typed)] == [200, 200, 200]
    assert grammars[0] is None and grammars[1] and grammars[2]
    assert grammars[1] != grammars[2] and "integer" in grammars[2]
    assert typed.json()["text"]["format"]["name"] == "thing"
    assert obj.json()["text"] == {"format": {"type": "json_object"}}
    assert plain.json()["text"] == {"format": {"type": "text"}}
    assert json.loads(Response.model_validate(typed.json()).output_text) == {"a": 1}


async def test_max_output_tokens_is_incomplete(fake_client: Any) -> None:
    async with fake_client(FAST) as client:
        plain = Response.model_validate((await client.post("/v1/responses", json={
            "input": "x", "max_output_tokens": 2})).json())
        resp = await client.post("/v1/responses", json={
            "input": "x", "max_output_tokens": 2, "stream": True})
    events = parse_sse(resp.text)
    final = check_stream(events)
    for response in (plain, final):
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.output_text == "Hello,"
        assert response.output[0].status == "incomplete"
        assert response.usage is not None and response.usage.output_tokens == 2
    assert events[-1]["type"] == "response.incomplete"


async def test_store_get_delete_and_404s(fake_client: Any) -> None:
    async with fake_client() as client:
        made = (await client.post("/v1/responses", json={"input": "x"})).json()
        got = await client.get(f"/v1/responses/{made['id']}")
        unstored = (await client.post("/v1/responses", json={"input": "x", "store": False}))
        deleted = await client.delete(f"/v1/responses/{made['id']}")
        after = await client.get(f"/v1/responses/{made['id']}")
        again = await client.delete(f"/v1/responses/{made['id']}")
        items = await client.get(f"/v1/responses/{made['id']}/input_items")
        gone = await client.get(f"/v1/responses/{unstored.json()['id']}")
        odd = await client.get("/v1/responses/..resp_x")
        prev = await client.post("/v1/responses", json={
            "input": "x", "previous_response_id": made["id"]})
    assert got.status_code == 200 and got.json() == made
    assert deleted.json() == {"id": made["id"], "object": "response.deleted", "deleted": True}
    for resp in (after, again, items, gone, odd):
        error = assert_error(resp, 404, "response_not_found")
        assert error["type"] == "not_found_error"
    assert assert_error(prev, 404, "response_not_found")["param"] == "previous_response_id"


async def test_input_items_pagination(fake_client: Any) -> None:
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    async with fake_client() as client:
        made = (await client.post("/v1/responses", json={"input": items})).json()
        url = f"/v1/responses/{made['id']}/input_items"
        desc = (await client.get(url)).json()
        page1 = (await client.get(url, params={"order": "asc", "limit": 2})).json()
        page2 = (await client.get(url, params={
            "order": "asc", "limit": 2, "after": page1["last_id"]})).json()
        before = (await client.get(url, params={
            "order": "asc", "before": page2["first_id"]})).json()
        bad = await client.get(url, params={"after": "msg_nope"})
    texts = lambda page: [i["content"][0]["text"] for i in page["data"]]  # noqa: E731
    assert texts(desc) == ["m4", "m3", "m2", "m1", "m0"] and desc["has_more"] is False
    assert texts(page1) == ["m0", "m1"] and page1["has_more"] is True
    assert texts(page2) == ["m2", "m3"] and page2["has_more"] is True
    assert texts(before) == ["m0", "m1"]
    assert ResponseItemList.model_validate(page2).first_id == page2["data"][0]["id"]
    assert assert_error(bad, 400)["param"] == "after"


async def test_responses_max_evicts_oldest_and_survives_restart(fake_client: Any) -> None:
    settings = {"responses_max": 2}
    async with fake_client(settings) as client:
        ids = [(await client.post("/v1/responses", json={"input": f"{i}"})).json()["id"]
               for i in range(3)]
        codes = [(await client.get(f"/v1/responses/{i}")).status_code for i in ids]
    assert codes == [404, 200, 200]
    async with fake_client(settings) as client:  # same cache dir, a new server
        kept = [(await client.get(f"/v1/responses/{i}")).status_code for i in ids]
        cont = await client.post("/v1/responses", json={
            "input": "more", "previous_response_id": ids[2]})
        newest = cont.json()["id"]
        after = [(await client.get(f"/v1/responses/{i}")).status_code for i in [*ids, newest]]
        prompt = client.engines[0].prompts[-1]
    assert kept == [404, 200, 200]
    assert cont.status_code == 200 and "<|im_start|>user\n2<|im_end|>" in prompt
    assert after == [404, 404, 200, 200]


async def test_failure_after_start_ends_in_response_failed(
    fake_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: FakeEngine, params: Any, gen: int) -> Any:
        yield 1, b"Hel"
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(FakeEngine, "_replay", broken)
    async with fake_client(FAST) as client:
        resp = await client.post("/v1/responses", json={"input": "x", "stream": True})
        events = parse_sse(resp.text)
        final = check_stream(events)
        stored = await client.get(f"/v1/responses/{final.id}")
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.completed" not in kinds
    assert final.status == "failed" and final.error is not None and final.error.message
    assert stored.status_code == 404


async def test_api_key_applies(fake_client: Any) -> None:
    async with fake_client({"api_key": ["sk-1"]}) as client:
        refused = await client.post("/v1/responses", json={"input": "x"})
        listed = await client.get("/v1/responses/resp_abc")
        ok = await client.post("/v1/responses", json={"input": "x"},
                               headers={"Authorization": "Bearer sk-1"})
    assert_error(refused, 401)
    assert_error(listed, 401)
    assert ok.status_code == 200


async def test_stored_responses_belong_to_their_key(fake_client: Any) -> None:
    a, b = {"Authorization": "Bearer sk-a"}, {"X-API-Key": "sk-b"}
    async with fake_client({"api_key": ["sk-a", "sk-b"]}) as client:
        made = (await client.post("/v1/responses", json={"input": "secret"}, headers=a)).json()
        url = f"/v1/responses/{made['id']}"
        missing = await client.get("/v1/responses/resp_nothere", headers=b)
        foreign = [
            await client.get(url, headers=b),
            await client.get(f"{url}/input_items", headers=b),
            await client.delete(url, headers=b),
        ]
        cont = await client.post("/v1/responses", headers=b, json={
            "input": "x", "previous_response_id": made["id"]})
        prompts_after_b = len(client.engines[0].prompts)
        own = [
            await client.get(url, headers=a),
            await client.get(f"{url}/input_items", headers=a),
            await client.post("/v1/responses", headers=a, json={
                "input": "y", "previous_response_id": made["id"]}),
        ]
        deleted = await client.delete(url, headers=a)
        record = client.app.state.responses.store.get(own[2].json()["id"])
    expected = assert_error(missing, 404, "response_not_found")
    for resp in foreign:  # exactly the 404 of an unknown id, its own id in the message
        error = assert_error(resp, 404, "response_not_found")
        assert error["type"] == expected["type"] and made["id"] in error["message"]
    assert assert_error(cont, 404, "response_not_found")["param"] == "previous_response_id"
    assert prompts_after_b == 1  # B's continuation never reached the engine
    assert [r.status_code for r in own] == [200, 200, 200]
    assert own[0].json() == made
    assert "secret" in client.engines[0].prompts[-1]
    assert deleted.json()["deleted"] is True
    # the owner is a hash of the key, never the key itself
    assert record["owner"].startswith("key_") and "sk-a" not in json.dumps(record)


async def test_records_without_owner_are_readable_only_without_keys(fake_client: Any) -> None:
    async with fake_client() as client:  # no keys: single-tenant, as before
        made = (await client.post("/v1/responses", json={"input": "x"})).json()
        store = client.app.state.responses.store
        record = store.get(made["id"])
        assert record["owner"] is None
        del record["owner"]  # a record as older versions wrote it
        store.put(record)
        unkeyed = await client.get(f"/v1/responses/{made['id']}")
    async with fake_client({"api_key": ["sk-a"]}) as client:  # same cache dir, keys now
        keyed = await client.get(f"/v1/responses/{made['id']}",
                                 headers={"Authorization": "Bearer sk-a"})
    assert unkeyed.status_code == 200
    assert_error(keyed, 404, "response_not_found")
