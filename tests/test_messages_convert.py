"""Messages -> chat conversion: cache_control cuts, prefill, stop reasons, and what Claude Code
sends (system entries in messages, server tools, the billing block) (no HTTP)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llmserve.anthropic.convert import stop_reason, to_chat
from llmserve.anthropic.schemas import MessagesRequest
from llmserve.chat.plan import plan_chat, render_chat
from llmserve.engine.base import ModelInfo
from llmserve.engine.fake import CHATML
from llmserve.errors import InvalidRequestError
from llmserve.output import Finished
from tests.conftest import FakeFactory

PIN = {"type": "ephemeral"}
TOOL = {"name": "f", "input_schema": {"type": "object"}}
AGENTS = Path(__file__).parent / "fixtures" / "agents"
CHAT_INFO = ModelInfo(name="m.gguf", path="m.gguf", n_ctx=2048, chat_template=CHATML,
                      bos_token="<s>", eos_token="</s>")


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


# --- what Claude Code sends (tests/fixtures/agents/claude_code_*.json) ---

BILLING = "x-anthropic-billing-header: cc_version=2.1.332.425; cc_entrypoint=sdk-cli;"


def test_system_entries_inside_messages_stay_where_they_stand() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "env A"},
                                       {"type": "text", "text": "env B"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "late"},
        {"role": "user", "content": "again"},
    ]
    for model in ("gemma-3-270m-q4_k_m.gguf", "claude-sonnet-4-5", "anything"):
        conv = to_chat(request(model=model, system="top", messages=messages))
        assert texts(conv.chat) == [("system", "top"), ("user", "hi"), ("system", "env A\nenv B"),
                                    ("assistant", "ok"), ("system", "late"), ("user", "again")]


def test_a_system_entry_between_a_tool_use_and_its_result_keeps_the_ids_open() -> None:
    conv = to_chat(request(tools=[TOOL], messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "system", "content": "note"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "r"}]}]))
    assert [m.role for m in conv.chat.messages] == ["user", "assistant", "system", "tool"]


def test_a_system_entry_takes_text_blocks_only() -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\.1\.content\.0: system messages"):
        to_chat(request(messages=[{"role": "user", "content": "q"}, {
            "role": "system", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]))


@pytest.mark.parametrize("billing", [
    BILLING,
    "x-anthropic-billing-header: cc_version=2.1.332.425; cc_entrypoint=sdk-cli; cch=0a1b2;",
    "x-anthropic-billing-header: cc_version=2.1.332.425; cc_entrypoint=sdk-cli; cch=ffff9;",
])
def test_the_billing_block_is_left_out(billing: str) -> None:
    system = [{"type": "text", "text": billing},
              {"type": "text", "text": "You are an agent.", "cache_control": PIN}]
    conv = to_chat(request(system=system))
    assert texts(conv.chat)[0] == ("system", "You are an agent.")
    # the pin cut at the second system block holds no billing text either
    assert conv.pin is not None and texts(conv.pin) == [("system", "You are an agent.")]
    assert not any("billing" in m.text() for m in conv.chat.messages)
    only = to_chat(request(system=billing))
    assert texts(only.chat)[0] == ("user", "one\ntwo")  # nothing left: no system message


def test_billing_variants_render_identical_prompts(tmp_path: Path) -> None:
    def prompt(billing: str) -> str:
        system = [{"type": "text", "text": billing}, {"type": "text", "text": "Be brief."}]
        plan = plan_chat(to_chat(request(system=system)).chat)
        return render_chat(CHAT_INFO, plan, tmp_path, None).text

    first = prompt(BILLING)
    assert first == prompt(BILLING.replace("sdk-cli;", "sdk-cli; cch=0a1b2;"))
    assert first == prompt(BILLING.replace("sdk-cli;", "sdk-cli; cch=93e7c;"))
    assert first == prompt("x-anthropic-billing-header: cc_version=2.2.0.1; cc_entrypoint=cli;")
    assert "billing" not in first and "Be brief." in first


SERVER_TOOLS = [
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    {"type": "web_fetch_20250910", "name": "web_fetch"},
    {"type": "code_execution_20250825", "name": "code_execution"},
    {"type": "bash_20250124", "name": "bash"},
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    {"type": "computer_20250124", "name": "computer", "display_width_px": 1024},
    {"type": "memory_20250818", "name": "memory"},
    {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
    {"type": "mcp_toolset", "mcp_server_name": "docs"},
]


def test_server_tools_are_left_out_with_a_warning_each(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    deferred = {**TOOL, "name": "g", "defer_loading": True}
    tools = [TOOL, *SERVER_TOOLS, {**TOOL, "name": "h", "type": "custom"}, deferred]
    with caplog.at_level(logging.WARNING, logger="llmserve.anthropic.convert"):
        conv = to_chat(request(tools=tools))
    assert conv.chat.tools is not None
    assert [t.function.name for t in conv.chat.tools] == ["f", "h", "g"]
    assert len(conv.warnings) == len(SERVER_TOOLS)
    assert conv.warnings[0] == ("tools.1 (web_search_20250305) is a server tool llmserve cannot "
                                "run; left out of the prompt")
    assert conv.warnings[-1].startswith("tools.9 (mcp_toolset) ")
    assert [r.getMessage() for r in caplog.records] == list(conv.warnings)


def test_only_server_tools_means_no_tools_and_a_header_safe_type() -> None:
    conv = to_chat(request(tools=[{"type": 'web"search\r\nX: 1', "name": "w"}]))
    assert conv.chat.tools is None and conv.chat.tool_choice is None
    assert conv.warnings == ("tools.0 (web?search??X??1) is a server tool llmserve cannot run; "
                             "left out of the prompt",)
    # a breakpoint on a server tool cuts before any custom tool: no tools in the pin
    conv = to_chat(request(tools=[{"type": "bash_20250124", "name": "bash",
                                   "cache_control": PIN}, TOOL]))
    assert conv.pin is not None and conv.pin.tools is None and conv.pin.tool_choice is None


def test_custom_tools_are_still_validated() -> None:
    with pytest.raises(ValidationError, match="input_schema"):
        request(tools=[{"name": "f"}])
    with pytest.raises(ValidationError, match="name"):
        request(tools=[{"type": "custom", "name": "no spaces", "input_schema": {}}])
    with pytest.raises(ValidationError, match="type"):
        request(tools=[{"name": "x"} | {"type": 3}])


def test_unknown_top_level_fields_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="llmserve.anthropic.schemas"):
        request(context_management={"edits": []}, output_config={"effort": "high"},
                speed="fast")
    [record] = [r for r in caplog.records if "unknown" in r.getMessage()]
    assert record.levelno == logging.DEBUG
    assert record.getMessage().endswith("ignoring unknown fields context_management, speed")


@pytest.mark.parametrize("name", sorted(p.stem for p in AGENTS.glob("claude_code_*.json")))
def test_captured_claude_code_requests_convert(name: str) -> None:
    captured = json.loads((AGENTS / f"{name}.json").read_text())
    req = MessagesRequest.model_validate(captured["body"])
    conv = to_chat(req)
    assert conv.warnings == ()
    prompt_text = "\n".join(m.text() for m in conv.chat.messages)
    assert "x-anthropic-billing-header" not in prompt_text
    assert conv.chat.tools is not None and len(conv.chat.tools) == len(captured["body"]["tools"])
    assert conv.chat.user is not None and conv.chat.user.startswith('{"device_id"')
    plan_chat(conv.chat)  # and the chat request plans without a 400
    in_messages = [m for m in captured["body"]["messages"] if m["role"] == "system"]
    systems = [m for m in conv.chat.messages[1:] if m.role == "system"]
    assert len(systems) == len(in_messages)
    if name.startswith("claude_code_json") or name.startswith("claude_code_stream"):
        assert in_messages  # unknown model names get system entries inside messages
