"""Messages -> chat conversion: cache_control cuts, prefill, stop reasons (no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.anthropic.convert import stop_reason, to_chat
from llmserve.anthropic.schemas import MessagesRequest
from llmserve.errors import InvalidRequestError
from llmserve.output import Finished
from tests.conftest import FakeFactory

PIN = {"type": "ephemeral"}
TOOL = {"name": "f", "input_schema": {"type": "object"}}


def request(**kw: Any) -> MessagesRequest:
    base: dict[str, Any] = {"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"}]}
    base.update(kw)
    return MessagesRequest.model_validate(base)


def texts(req: Any) -> list[tuple[str, str]]:
    return [(m.role, m.text()) for m in req.messages]


def test_no_breakpoint_no_pin() -> None:
    conv = to_chat(request())
    assert conv.pin is None and conv.prefill == ""
    assert texts(conv.chat) == [("user", "one\ntwo"), ("assistant", "three"), ("user", "four")]


def test_cut_at_a_system_block() -> None:
    system = [{"type": "text", "text": "A", "cache_control": PIN}, {"type": "text", "text": "B"}]
    conv = to_chat(request(system=system))
    assert texts(conv.chat)[0] == ("system", "A\nB")
    assert conv.pin is not None and texts(conv.pin) == [("system", "A")]
    assert conv.pin_seconds == 300


def test_cut_at_a_message_block_takes_the_furthest_and_the_longest_ttl() -> None:
    messages = request().model_dump()["messages"]
    messages[0]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    messages[1]["content"] = [{"type": "text", "text": "three", "cache_control": PIN}]
    conv = to_chat(request(messages=messages, system="S"))
    assert conv.pin is not None
    assert texts(conv.pin) == [("system", "S"), ("user", "one\ntwo"), ("assistant", "three")]
    assert conv.pin_seconds == 3600


def test_cut_inside_a_message_and_at_a_tool_result() -> None:
    messages = request().model_dump()["messages"]
    messages[0]["content"][0]["cache_control"] = PIN
    conv = to_chat(request(messages=messages))
    assert conv.pin is not None and texts(conv.pin) == [("user", "one")]
    calls = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1",
             "content": [{"type": "text", "text": "r", "cache_control": PIN}]},
            {"type": "text", "text": "more"}]},
    ]
    conv = to_chat(request(messages=calls, tools=[TOOL]))
    assert conv.pin is not None
    assert [m.role for m in conv.pin.messages] == ["user", "assistant", "tool"]
    assert conv.pin.tools is not None and conv.pin.tools[0].function.name == "f"


def test_cut_at_a_tool_and_at_the_top_level() -> None:
    tools = [{**TOOL, "cache_control": PIN}, {**TOOL, "name": "g"}]
    conv = to_chat(request(tools=tools))
    assert conv.pin is not None and conv.pin.tools is not None
    assert [t.function.name for t in conv.pin.tools] == ["f"]
    conv = to_chat(request(cache_control=PIN))
    assert conv.pin is not None and texts(conv.pin) == texts(conv.chat)


def test_prefill_and_only_assistant() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The (  "}]
    conv = to_chat(request(messages=messages))
    assert conv.prefill == "The ("
    assert texts(conv.chat) == [("user", "q")]
    with_tool = [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]
    conv = to_chat(request(messages=with_tool, tools=[TOOL]))
    assert conv.prefill == "" and conv.chat.messages[-1].tool_calls


def test_misplaced_blocks_are_400() -> None:
    with pytest.raises(InvalidRequestError, match="belong in user"):
        to_chat(request(messages=[{"role": "user", "content": "q"}, {
            "role": "assistant", "content": [
                {"type": "tool_result", "tool_use_id": "x", "content": "r"}]}]))
    with pytest.raises(InvalidRequestError, match="come before"):
        to_chat(request(tools=[TOOL], messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {}}]},
            {"role": "user", "content": [{"type": "text", "text": "x"}, {
                "type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]))


@pytest.mark.parametrize(("finished", "max_tokens", "expected"), [
    (Finished("stop", 3), 8, ("end_turn", None)),
    (Finished("stop", 3, stop_sequence="END"), 8, ("stop_sequence", "END")),
    (Finished("tool_calls", 3), 8, ("tool_use", None)),
    (Finished("length", 8), 8, ("max_tokens", None)),
    (Finished("length", 5), 8, ("model_context_window_exceeded", None)),
])
def test_stop_reasons(finished: Finished, max_tokens: int, expected: tuple[str, str | None]
                      ) -> None:
    assert stop_reason(finished, max_tokens) == expected


@pytest.mark.anyio
async def test_the_pinned_prefix_ends_after_the_marked_block(fake_client: FakeFactory) -> None:
    pinned: list[tuple[list[int], float]] = []
    async with fake_client() as client:
        cache = client.app.state.cache  # type: ignore[attr-defined]
        cache.pin = lambda engine, tokens, seconds: pinned.append((tokens, seconds)) or 0
        system = [{"type": "text", "text": "Rules.", "cache_control": {
            "type": "ephemeral", "ttl": "1h"}}]
        r = await client.post("/v1/messages", json={
            "model": "alpha.gguf", "max_tokens": 4, "system": system,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        prompt = client.engines[0].prompts[-1]  # type: ignore[attr-defined]
    [(tokens, seconds)] = pinned
    text = "".join(chr(t) for t in tokens)
    assert prompt.startswith(text) and seconds == 3600
    # the rendering cut after the system message shares the prompt up to the next turn
    assert text.startswith("<|im_start|>system\nRules.<|im_end|>\n")
    assert "Hi" not in text
