"""Responses input -> chat request conversion (no HTTP, no engine)."""

from __future__ import annotations

import pytest

from llmserve.errors import InvalidRequestError
from llmserve.responses import convert
from llmserve.responses.schemas import ResponsesRequest


def test_string_input_is_one_user_message() -> None:
    [item] = convert.input_items("hello")
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    assert item["id"].startswith("msg_") and item["status"] == "completed"


def test_items_get_canonical_shapes_and_keep_ids() -> None:
    items = convert.input_items([
        {"role": "assistant", "content": "plain", "id": "msg_given"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "ok"}]},
    ])
    assert items[0]["id"] == "msg_given"
    assert items[0]["content"] == [{"type": "output_text", "text": "plain", "annotations": []}]
    assert items[1]["id"].startswith("fc_") and items[1]["status"] == "completed"
    assert items[2]["output"] == "ok"


def test_calls_join_the_assistant_turn_before_them() -> None:
    items = convert.input_items([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2", "output": "2"},
        {"type": "reasoning", "summary": []},
    ])
    messages = convert.chat_messages("rules", items)
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[2].content == "Let me look."
    assert [c.id for c in messages[2].tool_calls or []] == ["c1", "c2"]
    assert [m.tool_call_id for m in messages[3:]] == ["c1", "c2"]


def test_output_for_a_call_in_history_counts() -> None:
    history = convert.input_items([
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}])
    now = convert.input_items([{"type": "function_call_output", "call_id": "c1", "output": "x"}])
    assert [m.role for m in convert.chat_messages(None, [*history, *now], 1)] == [
        "assistant", "tool"]
    with pytest.raises(InvalidRequestError) as info:
        convert.chat_messages(None, now)
    assert info.value.param == "input.0.call_id"


def test_chat_request_maps_fields() -> None:
    req = ResponsesRequest.model_validate({
        "input": "x", "max_output_tokens": 7, "temperature": 0.2, "seed": 5,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_object"}},
    })
    chat = convert.chat_request(req, [], convert.input_items("x"))
    assert chat.max_completion_tokens == 7 and chat.temperature == 0.2 and chat.seed == 5
    assert "top_p" not in chat.model_fields_set  # model defaults still fill unsent fields
    assert chat.tools is not None and chat.tools[0].function.name == "f"
    assert not isinstance(chat.tool_choice, str) and chat.tool_choice is not None
    assert chat.tool_choice.function.name == "f"
    assert chat.parallel_tool_calls is False
    assert chat.response_format is not None and chat.response_format.type == "json_object"


@pytest.mark.parametrize(("chat", "responses"), [
    ("response_format.json_schema", "text.format.schema"),
    ("tools.2.function.parameters", "tools.2.parameters"),
    ("messages.3.tool_call_id", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("tool_choice", "tool_choice"),
    (None, None),
])
def test_error_params_are_renamed(chat: str | None, responses: str | None) -> None:
    assert convert.responses_param(chat) == responses
