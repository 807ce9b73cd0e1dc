"""ResponseBuilder on its own: item transitions, the reasoning hook, failure events."""

from __future__ import annotations

from typing import Any

from openai.types.responses import Response

from llmserve.chat.tools import ToolCallDelta
from llmserve.output import Finished, ReasoningDelta, TextDelta
from llmserve.responses.events import ResponseBuilder, reasoning_text, usage
from tests.test_responses_http import EVENTS


def skeleton() -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress",
            "model": "m", "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": []}


def test_reasoning_then_text_then_calls() -> None:
    b = ResponseBuilder(skeleton())
    events = b.start() + b.reasoning("let me think") + b.reasoning(" more")
    events += b.text("Answer.") + b.call(ToolCallDelta(0, "call_a", "f", '{"x"'))
    events += b.call(ToolCallDelta(0, arguments=": 1}")) + b.call(ToolCallDelta(1, "call_b", "g"))
    events += b.finish(Finished("tool_calls", 9), usage(10, 4, 9, 3, True))
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = Response.model_validate(events[-1]["response"])
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call",
                                              "function_call"]
    reasoning, _message, first, second = final.output
    assert reasoning.content and reasoning.content[0].text == "let me think more"
    assert final.output_text == "Answer."
    assert (first.arguments, second.arguments) == ('{"x": 1}', "")
    assert all(i.status == "completed" for i in final.output)
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 3
    assert final.usage.input_tokens_details.cached_tokens == 4
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == kinds.count(
        "response.output_item.done") == 4
    assert "response.reasoning_text.done" in kinds


def test_empty_output_is_an_empty_message() -> None:
    b = ResponseBuilder(skeleton())
    events = b.start() + b.finish(Finished("stop", 0), usage(3, 0, 0, 0, False))
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "" and [i.type for i in final.output] == ["message"]
    assert final.usage is not None
    assert final.usage.input_tokens_details.cache_write_tokens == 0


def test_fail_closes_the_open_item() -> None:
    b = ResponseBuilder(skeleton())
    events = b.start() + b.text("Hel") + b.fail("boom")
    for event in events:
        EVENTS.validate_python(event)
    assert [e["type"] for e in events[-4:]] == [
        "response.content_part.done", "response.output_item.done", "error", "response.failed"]
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "failed" and final.error is not None
    assert final.error.message == "boom"
    assert final.output[0].status == "incomplete"


def test_reasoning_hook_reads_reasoning_deltas() -> None:
    assert reasoning_text(ReasoningDelta("hm")) == "hm"
    assert reasoning_text(TextDelta("hm")) is None
    assert reasoning_text(Finished("stop", 1)) is None
