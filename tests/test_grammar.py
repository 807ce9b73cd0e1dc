"""JSON schema -> GBNF (chat/grammar.py), checked with a reference recognizer, and the
tool-call grammars checked against the tool-call parsers of the same family."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llmserve.chat.grammar import (
    CALL_SHAPES,
    SchemaError,
    ToolSpec,
    assemble,
    schema_fragment,
    tool_calls_rules,
)
from llmserve.chat.tools import ToolCallDelta, make_parser
from tests.gbnf_recognizer import accepts


def grammar_for(schema: Any) -> str:
    frag = schema_fragment(schema, "s-", "response_format")
    return assemble(frag.root, frag)


def dumps(value: Any) -> str:
    """JSON written the way the grammar writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "role": {"enum": ["admin", "user", 3]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "nick": {"type": ["string", "null"]},
        "pet": {"anyOf": [{"type": "boolean"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age"],
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}},
                      "required": ["kind"]}},
}


@pytest.mark.parametrize("value", [
    {"name": "Ann", "age": 3},
    {"name": "Ann", "age": -3, "height": 1.5e3, "role": 3, "tags": ["a", "b"]},
    {"name": "Zoë\n\"q\"", "age": 0, "nick": None, "pet": {"kind": "cat"}},
    {"name": "B", "age": 7, "pet": False},
])
def test_schema_grammar_accepts_valid_json(value: dict[str, Any]) -> None:
    assert accepts(grammar_for(PERSON), dumps(value))


@pytest.mark.parametrize("text", [
    '{"age": 3}',  # required name missing
    '{"name": "", "age": 3}',  # minLength
    '{"name": "Annabelle!", "age": 3}',  # maxLength
    '{"name": "A", "age": 3.5}',  # not an integer
    '{"name": "A", "age": 01}',  # leading zero
    '{"name": "A", "age": 3, "role": "root"}',  # not in enum
    '{"name": "A", "age": 3, "tags": []}',  # minItems
    '{"name": "A", "age": 3, "tags": ["a", "b", "c"]}',  # maxItems
    '{"name": "A", "age": 3, "pet": {"kind": "dog"}}',  # const
    '{"name": "A", "age": 3, "extra": 1}',  # undeclared property
    '{"name": "A", "age": 3}  ',  # trailing text
    '{"name": "A\x01", "age": 3}',  # raw control character in a string
])
def test_schema_grammar_rejects_invalid_json(text: str) -> None:
    assert not accepts(grammar_for(PERSON), text)


def test_recursive_ref_and_maps() -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"]}}, "$ref": "#/$defs/node"}
    g = grammar_for(tree)
    assert accepts(g, dumps({"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": []}]}))
    assert not accepts(g, dumps({"v": 1, "kids": [{"v": 2}]}))
    scores = grammar_for({"type": "object", "additionalProperties": {"type": "number"}})
    assert accepts(scores, dumps({"a": 1, "b": 2.5}))
    assert not accepts(scores, dumps({"a": "x"}))
    anything = grammar_for({})
    for value in (1, "s", [1, {"a": None}], {"k": [True]}):
        assert accepts(anything, dumps(value))


def test_optional_only_object() -> None:
    g = grammar_for({"type": "object", "properties": {"a": {"type": "integer"},
                                                      "b": {"type": "integer"}}})
    for text in ("{}", '{"a": 1}', '{"b": 2}', '{"a": 1, "b": 2}'):
        assert accepts(g, text), text
    assert not accepts(g, '{"b": 2, "a": 1}')  # NOTE: properties come in schema order


@pytest.mark.parametrize("schema", [
    {"type": "strin"},
    {"type": "object", "properties": [1, 2]},
    {"type": "object", "properties": {"a": {}}, "required": "a"},
    {"type": "object", "properties": {"a": {}}, "required": ["b"]},
    {"enum": []},
    {"anyOf": "x"},
    {"$ref": "#/$defs/missing"},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": {"a": 1}},
    {"$ref": "#"},
    {"type": {"a": 1}},
    {"type": "array", "minItems": 3, "maxItems": 1},
    {"type": "string", "maxLength": -1},
    {"properties": {"a": 5}},
    42,
])
def test_invalid_schemas_are_400(schema: Any) -> None:
    with pytest.raises(SchemaError) as info:
        grammar_for(schema)
    assert info.value.status == 400
    assert info.value.param == "response_format"


def test_deep_schema_is_a_400_not_a_recursion_error() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(3000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(SchemaError):
        grammar_for(schema)


WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer"}}, "required": ["city"]}
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "days": 2})]


def render_calls(family: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    before, sep, after, key = CALL_SHAPES[family]
    return before + sep.join(dumps({"name": n, key: a}) for n, a in calls) + after


def parse_calls(family: str, text: str, step: int) -> tuple[str, list[tuple[str, Any]]]:
    parser = make_parser(family)
    pieces = []
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i : i + step])
    pieces += parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: dict[int, list[Any]] = {}
    for p in pieces:
        if isinstance(p, ToolCallDelta):
            calls.setdefault(p.index, [p.name, ""])[1] += p.arguments
    return content, [(n, json.loads(a)) for n, a in calls.values()]


@pytest.mark.parametrize("family", sorted(CALL_SHAPES))
def test_tool_call_grammar_matches_what_the_parser_reads(family: str) -> None:
    spec = ToolSpec("get_weather", schema_fragment(WEATHER, "t0-", "tools"))
    other = ToolSpec("ping", schema_fragment({"type": "object"}, "t1-", "tools"))
    rules = tool_calls_rules(family, [spec, other], parallel=True)
    grammar = assemble(rules.root, rules)
    calls = CALLS if family != "llama3" else CALLS[:1]  # NOTE: one call per Llama 3 reply
    text = render_calls(family, calls)
    assert accepts(grammar, text), text
    assert not accepts(grammar, render_calls(family, [("get_weather", {"days": 1})]))
    assert not accepts(grammar, render_calls(family, [("unknown", {})]))
    for step in (1, 2, 7, len(text)):
        assert parse_calls(family, text, step) == ("", calls)
    single = tool_calls_rules(family, [spec], parallel=False)
    assert not accepts(assemble(single.root, single), render_calls(family, CALLS))


def test_random_schemas_are_grammars_or_400s() -> None:
    """Whatever JSON a client sends as a schema: a grammar llama.cpp can take, or a 400."""
    from llmserve.chat import gbnf

    rng = random.Random(0)
    atoms: list[Any] = [None, True, False, 0, -1, 5, 2.5, "", "x", "string", "object", "array",
                        "integer", "#", "#/$defs/a", "#/a/0", [], {}, [1], {"a": 1}]
    keys = ["type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf",
            "allOf", "$ref", "$defs", "minItems", "maxItems", "minLength", "maxLength",
            "additionalProperties", "prefixItems", "nullable", "a"]

    def gen(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 3 or r < 0.3:
            return rng.choice(atoms)
        if r < 0.45:
            return [gen(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): gen(depth + 1) for _ in range(rng.randint(0, 4))}

    made = 0
    for _ in range(3000):
        try:
            gbnf.validate(grammar_for(gen()))
            made += 1
        except SchemaError:
            pass
    assert made > 100
