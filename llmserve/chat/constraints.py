"""Output constraints as llguidance grammars: JSON Schema, tool calls, GBNF, Lark and regex.

Every constraint is one llguidance Lark grammar (`%json {...}` embeds a JSON schema); the
engine compiles it against the model's tokenizer and masks each step's logits with it
(engine/guidance.py). What is enforced:
- response_format json_object: one JSON object; json_schema (strict or not): the schema, with
  every keyword llguidance supports (types, properties/required/additionalProperties, items,
  prefixItems, min/maxItems, min/maxLength, pattern, format, enum/const, anyOf/oneOf/allOf,
  local $ref/$defs, minimum/maximum, ...); keywords it cannot enforce are a 400.
- tool_choice required/named: the template family's tool-call markup around each tool's
  `{"name": ..., "arguments": <its parameters schema>}`; auto: a *lazy* grammar, free text
  until the family's trigger (`<tool_call>`, `[TOOL_CALLS]`, ...), then the calls.
- grammar (llama-server's field): GBNF, converted to Lark by llguidance.
- custom tools: a `regex` format is the `input` string's pattern; a `lark` format is checked
  (a bad one is a 400) and shown to the model, not enforced inside the JSON string.

JSON is written compactly (`", "` and `": "`, no other whitespace): tiny models cannot wander
off into endless whitespace, and the tool-call parsers see one shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from llmserve.errors import InvalidRequestError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 256 * 1024


class SchemaError(InvalidRequestError):
    """A JSON schema llguidance cannot enforce."""

    code = "invalid_schema"


class GrammarError(InvalidRequestError):
    """A grammar (GBNF, Lark, regex) llguidance cannot compile."""

    code = "invalid_grammar"


def _problem(grammar: str) -> str | None:
    """llguidance's complaint about a grammar (None: it compiles)."""
    try:
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return messages[0] if failed else None


def _short(message: str) -> str:
    return " ".join(message.split())[:300]


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")


def closed(schema: Any) -> Any:
    """schema with `additionalProperties: false` on each object schema that lists properties
    and says nothing about others: models are not asked to invent keys (tiny ones go on
    adding them until max_tokens). Every output stays valid under the original schema.
    allOf branches are left open (each would reject the others' properties)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), Mapping) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out and "patternProperties" not in out \
            and "allOf" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(v) for v in out[key]]
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
        if isinstance(out.get(key), Mapping):
            out[key] = closed(out[key])
    return out


def schema_expr(schema: Any, param: str) -> str:
    """A Lark expression (`%json {...}`) matching a JSON schema; a SchemaError (400) if
    llguidance cannot enforce it."""
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise SchemaError(f"invalid JSON schema: expected an object, got {schema!r:.60}",
                          param=param)
    guidance = schema.get("x-guidance")
    options = {**(guidance if isinstance(guidance, Mapping) else {}), **JSON_OPTIONS}
    try:
        text = json.dumps({**closed(schema), "x-guidance": options}, ensure_ascii=False,
                          allow_nan=False)
        problem = _problem(LLMatcher.grammar_from_json_schema(text))
    except (ValueError, TypeError, RecursionError) as exc:
        problem = str(exc) or type(exc).__name__
    if problem:
        raise SchemaError(f"invalid JSON schema: {_short(problem)}", param=param)
    return f"%json {text}"


JSON_OBJECT = schema_expr({"type": "object"}, "response_format")


def lit(text: str) -> str:
    """A Lark string literal matching exactly text."""
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~/" else c for c in text)


def grammar(start: str, rules: Mapping[str, str] | None = None) -> str:
    """An llguidance grammar from a start expression and named rules."""
    lines = [f"start: {start}", *(f"{name}: {body}" for name, body in (rules or {}).items())]
    return LLMatcher.grammar_from_lark("\n".join(lines) + "\n")


_ESCAPE = re.compile(r"\\\\|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}")


def _unescape(match: re.Match[str]) -> str:
    code = match.group()
    ch = chr(int(code[2:], 16)) if len(code) > 2 and int(code[2:], 16) <= 0x10FFFF else ""
    # NOTE: llguidance's converter copies \x, \u and \U escapes into Lark, which reads
    # them differently (`\U0001F600` became an invalid `\U1F600`): write printable ones out
    return ch if ch.isprintable() and ch not in '"\\[]^-' else code


def gbnf(text: str, param: str = "grammar") -> str:
    """An llguidance grammar from llama.cpp GBNF (`root ::= ...`); a GrammarError (400)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"invalid grammar: longer than {MAX_GRAMMAR_CHARS} characters",
                           param=param)
    try:
        out = LLMatcher.grammar_from_lark(any_to_lark(_ESCAPE.sub(_unescape, text)))
    except RecursionError:
        raise GrammarError("invalid grammar: nested too deeply", param=param) from None
    except Exception as exc:  # NOTE: the converter raises bare Exception for a missing root
        raise GrammarError(f"invalid grammar: {_short(str(exc))}", param=param) from exc
    problem = _problem(out)
    if problem:
        raise GrammarError(f"invalid grammar: {_short(problem)}", param=param)
    return out


def lark(text: str, param: str) -> str:
    """An llguidance grammar from a Lark grammar; a GrammarError (400) if it does not compile."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"invalid grammar: longer than {MAX_GRAMMAR_CHARS} characters",
                           param=param)
    out = LLMatcher.grammar_from_lark(text)
    problem = _problem(out)
    if problem:
        raise GrammarError(f"invalid lark grammar: {_short(problem)}", param=param)
    return out


def regex(text: str, param: str) -> str:
    """An llguidance grammar from a regular expression; a GrammarError (400)."""
    out = LLMatcher.grammar_from_regex(text)
    problem = _problem(out)
    if problem:
        raise GrammarError(f"invalid regex: {_short(problem)}", param=param)
    return out


def custom_input_schema(fmt: Mapping[str, Any] | None, param: str) -> dict[str, Any]:
    """The schema of a custom tool's `input` string: a regex format is its pattern; a Lark
    format is checked (400) but not enforced inside the JSON string."""
    schema: dict[str, Any] = {"type": "string"}
    if not fmt or fmt.get("type") != "grammar":
        return schema
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if not isinstance(definition, str) or not definition.strip():
        raise GrammarError("a grammar format needs a definition", param=f"{param}.definition")
    if syntax == "regex":
        regex(definition, f"{param}.definition")
        return {**schema, "pattern": definition}
    if syntax == "lark":
        lark(definition, f"{param}.definition")
        return schema
    raise GrammarError(f"unknown grammar syntax {syntax!r:.40} (lark or regex)",
                       param=f"{param}.syntax")


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call, with its arguments' Lark expression."""

    name: str
    arguments: str


# family -> (text before the calls, separator between calls, text after, args key, trigger)
CALL_SHAPES = {
    "hermes": ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>", "arguments",
               "<tool_call>"),
    "llama3": ("", "; ", "", "parameters", '{"name": "'),
    "mistral": ("[TOOL_CALLS][", ", ", "]", "arguments", "[TOOL_CALLS]"),
    "json": ('{"tool_calls": [', ", ", "]}", "arguments", '{"tool_calls": ['),
}


def _shape(family: str) -> tuple[str, str, str, str, str]:
    return CALL_SHAPES.get(family, CALL_SHAPES["json"])


def _calls(family: str, tools: list[ToolSpec], parallel: bool,
           skip: str = "") -> tuple[str, dict[str, str]]:
    """(expression, rules) for one or more calls; skip: text already matched (a trigger)
    cut from the front of the first call."""
    before, sep, after, key, _ = _shape(family)
    rules: dict[str, str] = {}
    alts, firsts = [], []
    for i, tool in enumerate(tools):
        head = json.dumps({"name": tool.name}, ensure_ascii=False)[:-1] + f', "{key}": '
        rules[f"args_{i}"] = tool.arguments
        rules[f"call_{i}"] = f'{lit(head)} args_{i} "}}"'
        alts.append(f"call_{i}")
        opening = before + head
        if not opening.startswith(skip):
            raise ValueError(f"{skip!r} does not start a {family} call")
        rest = opening[len(skip):]
        firsts.append(f'{lit(rest)} args_{i} "}}"' if rest else f'args_{i} "}}"')
    rules["call"] = " | ".join(alts)
    rules["first_call"] = " | ".join(f"({f})" for f in firsts)
    parts = ["first_call"]
    if parallel and family != "llama3":
        parts.append(f"({lit(sep)} call)*")
    if after:
        parts.append(lit(after))
    return " ".join(parts), rules


def tool_calls(family: str, tools: list[ToolSpec], parallel: bool) -> tuple[str, dict[str, str]]:
    """(expression, rules) matching one or more calls to tools in the family's markup."""
    return _calls(family, tools, parallel, skip="")


def lazy_tool_calls(family: str, tools: list[ToolSpec], parallel: bool) -> str:
    """Free text, or free text up to the family's trigger and then calls to tools: the
    grammar of tool_choice auto (llama-server's lazy grammars, as one llguidance grammar)."""
    trigger = _shape(family)[4]
    expr, rules = _calls(family, tools, parallel, skip=trigger)
    rx = _regex_escape(trigger)
    rules["prefix[lazy]"] = f"/(?s:.*){rx}/"
    # NOTE: FREE cannot contain the trigger, so text holding it must go on as a call
    rules["FREE"] = f"/(?s:.*)/ & ~/(?s:.*{rx}.*)/"
    return grammar(f"FREE | prefix {expr}", rules)

