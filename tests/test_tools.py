"""Tool-call parsers (chat/tools.py) on scripted streams: markup split at every boundary."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from llmserve.chat.tools import PARSERS, ToolCallDelta, detect_family, make_parser

Call = tuple[str, Any]


def run(family: str | None, chunks: list[str]) -> tuple[str, list[Call], list[ToolCallDelta]]:
    parser = make_parser(family)
    pieces: list[Any] = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
    pieces += parser.finish()
    deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
    calls: dict[int, list[Any]] = {}
    for d in deltas:
        calls.setdefault(d.index, [d.name, ""])[1] += d.arguments
    assert parser.calls == len(calls)
    content = "".join(p for p in pieces if isinstance(p, str))
    return content, [(n, json.loads(a)) for n, a in calls.values()], deltas


def splits(text: str) -> list[list[str]]:
    """The text in one piece, char by char, in pairs, and cut at random points."""
    rng = random.Random(len(text))
    out = [[text], list(text), [text[i : i + 2] for i in range(0, len(text), 2)]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def assert_openai_shape(deltas: list[ToolCallDelta]) -> None:
    """id and name only in a call's first delta; indexes count up from 0."""
    seen: set[int] = set()
    for d in deltas:
        if d.index not in seen:
            assert d.index == len(seen)
            assert d.id is not None and re.fullmatch(r"call_[A-Za-z0-9]{24}", d.id)
            assert d.name
            seen.add(d.index)
        else:
            assert d.id is None and d.name is None
    assert len({d.id for d in deltas if d.id}) == len(seen)


CASES: list[tuple[str, str, str, list[Call]]] = [
    # family, model output, content, calls
    ("hermes",
     'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}\n'
     "</tool_call>",
     "Let me check.", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": [2, "}"]})]),
    ("hermes", "No tools needed: 2 < 3 and <tool> is not a tag.",
     "No tools needed: 2 < 3 and <tool> is not a tag.", []),
    # arguments first, as a JSON string, nested "function": parsed when the block closes
    ("hermes", '<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>',
     "", [("search", {"q": "x"})]),
    ("hermes", '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>',
     "", [("search", {"q": "x"})]),
    ("hermes",
     '<tool_call>\n{"type": "function", "function": {"name": "f", "arguments": {}}}\n</tool_call>',
     "", [("f", {})]),
    # an unclosed last call at end of output (Qwen does this), then text after a call
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}', "", [("f", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.', "Done.",
     [("f", {})]),
    # not a call: the block stays content; a call cut off by max_tokens is dropped
    ("hermes", "<tool_call>I cannot</tool_call>", "<tool_call>I cannot</tool_call>", []),
    ("hermes", 'Sure <tool_call>\n{"name": "f", "argu', "Sure", []),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"s": "a;b"}}; '
     '{"name": "g", "parameters": {}}', "", [("f", {"s": "a;b"}), ("g", {})]),
    ("llama3", '{"name": "f", "parameters": {"x": 1}}', "", [("f", {"x": 1})]),
    ("llama3", "The answer is {42}.", "The answer is {42}.", []),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", 'Checking. [TOOL_CALLS][{"name": "f", "arguments": {"x": "]"}}, '
     '{"name": "g", "arguments": {}}]', "Checking.", [("f", {"x": "]"}), ("g", {})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": {"y": 2}}[TOOL_CALLS]g[CALL_ID]a1b2c3d4e[ARGS]{}',
     "", [("f", {"x": {"y": 2}}), ("g", {})]),
    ("mistral", "Plain [TOOL answer", "Plain [TOOL answer", []),
    ("json", '{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, '
     '{"name": "g", "arguments": {}}]}', "", [("f", {"x": 1}), ("g", {})]),
    ("json", '[{"name": "f", "arguments": {"x": 1}}]', "", [("f", {"x": 1})]),
    ("json", '{"name": "f", "arguments": {"x": 1}}', "", [("f", {"x": 1})]),
    ("json", "Plain answer.", "Plain answer.", []),
    ("json", '{"tool_call": 3}', '{"tool_call": 3}', []),
]


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_parsers_at_every_split(family: str, text: str, content: str, calls: list[Call]) -> None:
    for chunks in splits(text):
        got_content, got_calls, deltas = run(family, chunks)
        assert (got_content, got_calls) == (content, calls), chunks
        assert_openai_shape(deltas)


def test_arguments_stream_in_pieces_before_the_call_ends() -> None:
    parser = make_parser("hermes")
    text = '<tool_call>\n{"name": "f", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    pieces: list[Any] = []
    for ch in text[: text.index("3")]:
        pieces += parser.feed(ch)
    first, *rest = pieces
    assert first == ToolCallDelta(0, first.id, "f", "")
    assert len(rest) > 5
    assert "".join(p.arguments for p in rest) == '{"city": "Paris", "days": '


def test_plain_text_is_unchanged() -> None:
    text = "  <tool_call>{not parsed}</tool_call>\n\n"
    assert run(None, list(text))[0] == text
    assert run("hermes", ["Hello ", " world \n"])[0] == "Hello  world \n"


def test_real_model_output() -> None:
    # Gemma 3 270M, asked with tools in the prompt, echoes the prompt and starts a call in the
    # nested "function" shape before max_tokens cuts it off.
    gemma = ("You are a helpful assistant.\n\nYou are provided with function signatures within "
             '<tool_call></tool_call> XML tags:\n<tool_call>\n{"type": "function", '
             '"function": {"name":')
    content, calls, _ = run("hermes", [gemma])
    assert calls == []
    assert content.startswith("You are a helpful assistant.") and "<tool_call>" in content
    # SmolLM2 135M under tool_choice=required: the same call twice, each closed.
    smol = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    # the repeat is dropped: one call, and the parser says the output is done
    assert run("hermes", list(smol))[:2] == ("", [("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize(("template", "family"), [
    ("{{ '<tool_call>' }}", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "json"),
])
def test_detect_family(template: str, family: str) -> None:
    assert detect_family(template) == family


@pytest.mark.parametrize("family", [*sorted(PARSERS), None])
def test_random_markup_never_breaks_a_parser(family: str | None) -> None:
    rng = random.Random(2)
    pieces = ["<tool_call>", "</tool_call>", "<tool", "_call>", "{", "}", "[", "]", '"', "\\",
              '"name"', ": ", '"arguments"', '"parameters"', ", ", '"f"', "x", " ", "\n",
              "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>", ";", '{"tool_calls": [',
              "1", "null", '"function"']
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, max(len(text), 2)), min(3, max(len(text) - 1, 0))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        parser = make_parser(family)
        out = [p for c in chunks for p in parser.feed(c)] + parser.finish()
        assert_openai_shape([p for p in out if isinstance(p, ToolCallDelta)])
        if family is None:
            assert "".join(p for p in out if isinstance(p, str)) == text


PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Rome"}}\n</tool_call>\n'


@pytest.mark.parametrize("chunks", splits(PARIS + ROME + PARIS.replace(": ", ":")))
def test_identical_call_ends_the_output(chunks: list[str]) -> None:
    parser = make_parser("hermes")
    pieces: list[Any] = []
    for chunk in chunks:
        pieces += parser.feed(chunk)
    assert parser.done  # the third block repeats the first (same JSON, other spacing)
    pieces += parser.finish()
    deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
    assert [d.name for d in deltas if d.name] == ["get_weather", "get_weather"]
    assert {d.index for d in deltas} == {0, 1} and parser.calls == 2
    assert "".join(d.arguments for d in deltas if d.index == 1) == '{"city":"Rome"}'


def test_max_calls_one_stops_after_the_first_call() -> None:
    parser = make_parser("hermes", max_calls=1)
    pieces = parser.feed(PARIS)
    assert parser.done and parser.calls == 1
    pieces += parser.feed(ROME) + parser.finish()
    assert [p.name for p in pieces if isinstance(p, ToolCallDelta) and p.name] == ["get_weather"]


def test_a_later_call_cut_off_still_streams_what_it_had() -> None:
    parser = make_parser("hermes")
    pieces = parser.feed(PARIS + '<tool_call>\n{"name": "add", "arguments": {"a": 1')
    pieces += parser.finish()
    assert not parser.done
    assert [p.name for p in pieces if isinstance(p, ToolCallDelta) and p.name] == [
        "get_weather", "add"]
