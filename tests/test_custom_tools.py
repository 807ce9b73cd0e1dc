"""Custom tools (chat/custom_tools.py) and a Responses request's tool set (responses/tools.py):
the freeform function, the input decoded while it streams, namespaces, hosted tools."""

from __future__ import annotations

import json

import pytest

from llmserve.chat.custom_tools import InputStream, as_function, freeform_input
from llmserve.errors import InvalidRequestError
from llmserve.responses import convert
from llmserve.responses.tools import Target, tool_set
from llmserve.schemas import ChatCompletionRequest, CustomToolSpec, ToolDefinition

PATCH = '*** Begin Patch\n*** Add File: "a b".txt\n+héllo \\ 😀\n*** End Patch\n'
LARK = {"type": "grammar", "syntax": "lark",
        "definition": 'start: "*** Begin Patch" LF\n%import common.LF'}


def test_as_function_describes_the_freeform_input_and_grammar() -> None:
    fn = as_function(CustomToolSpec(name="apply_patch", description="Edit files.",
                                    format=LARK)).function
    assert fn.name == "apply_patch"
    assert fn.parameters == {"type": "object", "properties": {"input": {
        "type": "string", "description": "The freeform input."}}, "required": ["input"]}
    assert fn.description is not None
    assert fn.description.startswith("Edit files.")
    assert "`input` string" in fn.description
    assert "lark grammar:\nstart: \"*** Begin Patch\" LF" in fn.description
    plain = as_function(CustomToolSpec(name="t")).function.description
    assert plain is not None and "grammar" not in plain


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_input_stream_decodes_pieces_of_any_size(cut: int) -> None:
    arguments = json.dumps({"input": PATCH})  # \n, \", \\ and a surrogate pair escaped
    stream = InputStream()
    pieces = [stream.feed(arguments[i:i + cut]) for i in range(0, len(arguments), cut)]
    rest, whole = stream.finish()
    assert whole == PATCH
    assert "".join(pieces) + rest == PATCH
    assert rest == ""  # the closing quote ends the text: nothing is left for finish
    assert sum(1 for p in pieces if p) > 3  # it streamed


def test_input_stream_never_hands_out_half_an_escape() -> None:
    stream = InputStream()
    assert stream.feed('{"input": "a\\') == "a"
    assert stream.feed("u00") == ""
    assert stream.feed("e9\\ud83d") == "é"
    assert stream.feed("\\ude00") == "😀"
    assert stream.feed('"}') == ""
    assert stream.finish() == ("", "aé😀")


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"input": "x"}', "x"),
    ('{"patch": "x"}', "x"),  # one string under another name: a model that renamed it
    ('"x"', "x"),
    ('{"a": 1, "b": 2}', '{"a": 1, "b": 2}'),
    ("not json", "not json"),
])
def test_freeform_input_fallbacks(arguments: str, expected: str) -> None:
    assert freeform_input(arguments) == expected
    stream = InputStream()
    streamed = stream.feed(arguments)
    rest, whole = stream.finish()
    assert whole == expected and streamed + rest == expected


def test_chat_request_reads_custom_tools_calls_and_choice() -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": [
            {"role": "user", "content": "patch it"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom", "custom": {
                "name": "apply_patch", "input": PATCH}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ],
        "tools": [{"type": "custom", "custom": {"name": "apply_patch", "format": LARK}},
                  {"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "custom", "custom": {"name": "apply_patch"}},
    })
    assert req.tools is not None and req.tools[0].type == "custom"
    call = req.messages[1].tool_calls[0]  # type: ignore[index]
    assert call.function.name == "apply_patch"
    assert json.loads(call.function.arguments) == {"input": PATCH}
    assert not isinstance(req.tool_choice, str) and req.tool_choice is not None
    assert req.tool_choice.function.name == "apply_patch"


def test_namespace_tools_are_flattened_and_mapped_back() -> None:
    fn = {"type": "function", "name": "search", "parameters": {"type": "object"}}
    tools = tool_set([
        {"type": "function", "name": "exec_command"},
        {"type": "namespace", "name": "alpha", "tools": [fn, {"type": "custom", "name": "run"}]},
        {"type": "namespace", "name": "beta_", "tools": [fn]},  # the same inner name
        {"type": "function", "name": "alpha__search"},  # a plain tool with the flat name
        {"type": "namespace", "name": "n" * 60, "tools": [fn]},  # past 64 characters
        {"type": "web_search", "external_web_access": False},
        {"type": "tool_search", "execution": "client", "parameters": {"type": "object"}},
    ])
    names = [t.function.name if isinstance(t, ToolDefinition) else t.custom.name
             for t in tools.chat]
    assert names[:4] == ["exec_command", "alpha__search", "alpha__run", "beta__search"]
    assert names[4].startswith("alpha__search_") and names[4] != "alpha__search"
    assert len(names[5]) == 64 and len(set(names)) == 6
    assert tools.target("alpha__search") == Target("search", "alpha")
    assert tools.target("alpha__run") == Target("run", "alpha", custom=True)
    assert tools.target("beta__search") == Target("search", "beta_")
    assert tools.target(names[4]) == Target("alpha__search")
    assert tools.target(names[5]) == Target("search", "n" * 60)
    assert tools.target("exec_command") == Target("exec_command")
    assert tools.hosted == ["web_search", "tool_search"]
    assert tools.flat_name("beta_", "search") == "beta__search"
    assert tools.flat_name(None, "exec_command") == "exec_command"


def test_call_items_round_trip_as_chat_tool_calls() -> None:
    tools = tool_set([
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "multi_agent_v1", "tools": [
            {"type": "function", "name": "spawn_agent"}]},
    ])
    items = convert.input_items([
        {"role": "user", "content": "go"},
        {"type": "custom_tool_call", "id": "ctc_1", "call_id": "c1", "name": "apply_patch",
         "input": PATCH, "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "spawn_agent",
         "namespace": "multi_agent_v1", "arguments": "{}"},
        {"type": "custom_tool_call_output", "id": "ctco_1", "call_id": "c1", "output": "ok"},
        {"type": "function_call_output", "id": "fco_2", "call_id": "c2",
         "output": [{"type": "input_text", "text": "spawned"}]},
    ])
    assert [i["id"] for i in items[1:]] == ["ctc_1", items[2]["id"], "ctco_1", "fco_2"]
    assert items[2]["namespace"] == "multi_agent_v1"
    assert items[3]["type"] == "custom_tool_call_output" and items[3]["output"] == "ok"
    messages = convert.chat_messages(None, items, tools=tools)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    first, second = messages[1].tool_calls or []
    assert (first.id, first.function.name) == ("c1", "apply_patch")
    assert json.loads(first.function.arguments) == {"input": PATCH}
    assert second.function.name == "multi_agent_v1__spawn_agent"
    assert [m.tool_call_id for m in messages[2:]] == ["c1", "c2"]
    with pytest.raises(InvalidRequestError, match="custom_tool_call_output"):
        convert.chat_messages(None, [items[0], items[3]], tools=tools)
