"""MessageBuilder on scripted parts: thinking, text and tool_use blocks, checked by the SDK."""

from __future__ import annotations

from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from llmserve.anthropic.events import MessageBuilder, Thinking, error_type, tool_use_id, usage
from llmserve.chat.tools import ToolCallDelta

STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)


def test_thinking_then_text_then_tool() -> None:
    b = MessageBuilder("msg_x", "m")
    events = b.start(usage(10, 0, 4, 2))
    parts = [Thinking("Let me "), Thinking("think."), "Answer", "", " here.",
             ToolCallDelta(0, "call_abc", "f", ""), ToolCallDelta(0, arguments='{"a": '),
             ToolCallDelta(0, arguments="1}"), ToolCallDelta(1, "call_def", "g", "{}")]
    for part in parts:
        events += b.feed(part)
    events += b.finish("tool_use", None, usage(10, 7, 4, 2))
    for e in events:
        if e["type"] != "ping":
            STREAM_EVENT.validate_python(e)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use"]
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert stops == [0, 1, 2, 3]
    kinds = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert kinds == ["thinking_delta"] * 2 + ["text_delta"] * 2 + ["input_json_delta"] * 3
    msg = Message.model_validate(b.message("tool_use", None, usage(10, 7, 4, 2)))
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == "Let me think."
    assert msg.content[1].type == "text" and msg.content[1].text == "Answer here."
    assert msg.content[2].type == "tool_use" and msg.content[2].input == {"a": 1}
    assert msg.content[2].id == "toolu_abc"
    assert msg.content[3].type == "tool_use" and msg.content[3].name == "g"
    assert msg.usage.input_tokens == 4 and msg.usage.cache_read_input_tokens == 4


def test_usage_and_error_types() -> None:
    assert usage(100, 5, 60, 64) == {"input_tokens": 0, "output_tokens": 5,
                                    "cache_read_input_tokens": 60,
                                    "cache_creation_input_tokens": 64}
    assert error_type(400) == "invalid_request_error"
    assert error_type(503) == "overloaded_error"
    assert error_type(502) == "api_error"
    assert tool_use_id(None).startswith("toolu_") and len(tool_use_id(None)) == 30
