"""JSON schema -> GBNF, and the grammars that force tool calls or JSON output.

Supported: type (and type lists), properties/required, additionalProperties, items,
prefixItems, minItems/maxItems, minLength/maxLength, enum, const, anyOf/oneOf, allOf of
objects, $ref into the same schema ($defs, definitions, any `#/...` pointer), nullable.
Not enforced (accepted, ignored): pattern, format, minimum/maximum, multipleOf.

Output is compact JSON with `": "` and `", "` separators and no other whitespace: tiny models
cannot wander off into endless whitespace, and the tool-call parsers see one shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmserve.chat import gbnf
from llmserve.errors import InvalidRequestError

MAX_DEPTH = 48
MAX_COUNT = 1000  # larger min/max counts are not worth a grammar

PRIMITIVES = {
    "ws": '" "?',
    "char": r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "number": r'integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" (string ": " value (", " string ": " value)*)? "}"',
    "array": '"[" (value (", " value)*)? "]"',
}
_DEPENDS = {
    "string": ["char"], "number": ["integer"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value"], "array": ["value"],
}
TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}


class SchemaError(InvalidRequestError):
    """A JSON schema we cannot turn into a grammar."""

    code = "invalid_schema"


def literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_literal(value: Any) -> str:
    """A GBNF literal for a JSON value written compactly like the grammar's own output."""
    return literal(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


@dataclass
class Fragment:
    """Rules for one schema; `root` is the rule matching it."""

    root: str
    rules: dict[str, str] = field(default_factory=dict)


class _Converter:
    def __init__(self, schema: Any, prefix: str, param: str):
        self.doc = schema
        self.prefix = prefix
        self.param = param
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def error(self, message: str) -> SchemaError:
        return SchemaError(f"invalid JSON schema: {message}", param=self.param)

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dep in _DEPENDS.get(name, []):
                self.primitive(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        if body in self.by_body:
            return self.by_body[body]
        name = self.fresh(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def fresh(self, hint: str) -> str:
        base = self.prefix + (re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-") or "x")
        name, n = base, 1
        while name in self.rules or name in PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = ""  # reserved
        return name

    def count(self, schema: Mapping[str, Any], key: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.error(f"{key} must be a non-negative integer")
        return value

    def bounds(self, schema: Mapping[str, Any], lo_key: str, hi_key: str) -> tuple[int, int | None]:
        lo = self.count(schema, lo_key) or 0
        hi = self.count(schema, hi_key)
        if hi is not None and hi < lo:
            raise self.error(f"{hi_key} is below {lo_key}")
        if lo > MAX_COUNT:
            raise self.error(f"{lo_key} above {MAX_COUNT} is not supported")
        return lo, (hi if hi is not None and hi <= MAX_COUNT else None)

    def visit(self, schema: Any, hint: str, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels")
        if schema is True or schema == {}:
            return self.primitive("value")
        if not isinstance(schema, Mapping):
            raise self.error(f"expected a schema object at {hint!r}, got {schema!r:.60}")
        expr = self.visit_inner(schema, hint, depth + 1)
        if schema.get("nullable") is True:
            expr = self.add(hint, f"{expr} | {self.primitive('null')}")
        return expr

    def visit_inner(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        if "$ref" in schema:
            return self.ref(schema["$ref"], depth)
        if "const" in schema:
            return self.add(hint, json_literal(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.error("enum must be a non-empty list")
            return self.add(hint, " | ".join(json_literal(v) for v in values))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise self.error(f"{key} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != key}
                alts = [self.visit({**rest, **s} if isinstance(s, Mapping) else s,
                                   f"{hint}-{i}", depth) for i, s in enumerate(subs)]
                return self.add(hint, " | ".join(alts))
        if "allOf" in schema:
            return self.visit(self.merge_all(schema), hint, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or any(not isinstance(k, str) or k not in TYPES for k in kind):
                raise self.error(f"unknown type in {kind!r}")
            alts = [self.visit({**schema, "type": k}, f"{hint}-{k}", depth) for k in kind]
            return self.add(hint, " | ".join(alts))
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return self.primitive("value")
        if not isinstance(kind, str) or kind not in TYPES:
            raise self.error(f"unknown type {kind!r:.60}")
        if kind == "object":
            return self.object(schema, hint, depth)
        if kind == "array":
            return self.array(schema, hint, depth)
        if kind == "string":
            lo, hi = self.bounds(schema, "minLength", "maxLength")
            if lo == 0 and hi is None:
                return self.primitive("string")
            char = self.primitive("char")
            reps = f"{{{lo},{'' if hi is None else hi}}}"
            return self.add(hint, f'"\\"" {char}{reps} "\\""')
        return self.primitive(str(kind))

    def ref(self, ref: Any, depth: int) -> str:
        target = self.resolve(ref)
        if ref in self.refs:
            return self.refs[ref]
        tail = ref.rsplit("/", 1)[-1] or "root-ref"
        name = self.refs[ref] = self.fresh(tail)
        self.rules[name] = self.visit(target, tail, depth)
        return name

    def merge_all(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        subs = schema["allOf"]
        if not isinstance(subs, list) or not subs:
            raise self.error("allOf must be a non-empty list")
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        props = merged.get("properties") or {}
        required = merged.get("required") or []
        if not isinstance(props, Mapping) or not isinstance(required, list):
            raise self.error("properties must be an object and required a list")
        props, required = dict(props), list(required)
        for sub in subs:
            if isinstance(sub, Mapping) and "$ref" in sub:
                sub = self.resolve(sub["$ref"])
            if not isinstance(sub, Mapping):
                raise self.error("allOf items must be schema objects")
            for key, value in sub.items():
                if key == "properties" and isinstance(value, Mapping):
                    props.update(value)
                elif key == "required" and isinstance(value, list):
                    required += [r for r in value if r not in required]
                else:
                    merged.setdefault(key, value)
        if props:
            merged["properties"] = props
        if required:
            merged["required"] = required
        return merged

    def resolve(self, ref: Any) -> Any:
        """The schema a local `$ref` (a JSON pointer into this document) points at."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.error(f"only local $ref (#/...) is supported, got {ref!r:.60}")
        target: Any = self.doc
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.error(f"$ref {ref!r} does not resolve")
        return target

    def object(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(props, Mapping):
            raise self.error("properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.error("required must be a list of property names")
        extra = schema.get("additionalProperties", True)
        if not props:
            if extra is False:
                return self.add(hint, '"{}"')
            if extra is True or extra == {}:
                return self.primitive("object")
            value = self.visit(extra, f"{hint}-value", depth)
            key = self.primitive("string")
            return self.add(hint, f'"{{" ({key} ": " {value} (", " {key} ": " {value})*)? "}}"')
        pairs = {
            name: f'{literal(json.dumps(name, ensure_ascii=False) + ": ")} '
                  f"{self.visit(sub, f'{hint}-{name}', depth)}"
            for name, sub in props.items()
        }
        unknown = [r for r in required if r not in pairs]
        if unknown:
            raise self.error(f"required names undefined properties: {unknown}")
        must = [pairs[n] for n in pairs if n in required]
        may = [pairs[n] for n in pairs if n not in required]
        if must:
            body = ' ", " '.join(must) + "".join(f' (", " {p})?' for p in may)
        else:
            alts = [p + "".join(f' (", " {q})?' for q in may[i + 1 :]) for i, p in enumerate(may)]
            body = "(" + " | ".join(alts) + ")?"
        return self.add(hint, f'"{{" {body} "}}"')

    def array(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        prefix = schema.get("prefixItems")
        if prefix is not None:
            if not isinstance(prefix, list) or not prefix:
                raise self.error("prefixItems must be a non-empty list")
            parts = [self.visit(s, f"{hint}-{i}", depth) for i, s in enumerate(prefix)]
            return self.add(hint, '"[" ' + ' ", " '.join(parts) + ' "]"')
        item = self.visit(schema.get("items", True), f"{hint}-item", depth)
        lo, hi = self.bounds(schema, "minItems", "maxItems")
        if hi == 0:
            return self.add(hint, '"[]"')
        more = f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        if lo == 0:
            return self.add(hint, f'"[" ({item} (", " {item}){more})? "]"')
        return self.add(hint, f'"[" {item} (", " {item}){more} "]"')


def schema_fragment(schema: Any, prefix: str, param: str) -> Fragment:
    """Rules matching a JSON schema (400 SchemaError if we cannot)."""
    converter = _Converter(schema, prefix, param)
    try:
        root = converter.visit(schema, "root")
    except RecursionError as exc:
        raise converter.error("nested too deeply") from exc
    fragment = Fragment(root, converter.rules)
    try:
        assemble(root, fragment)
    except gbnf.GrammarError as exc:  # e.g. {"$ref": "#"}: a rule made only of itself
        raise converter.error(exc.message.removeprefix("invalid grammar: ")) from exc
    return fragment


def assemble(root: str, *fragments: Fragment, extra: Mapping[str, str] | None = None) -> str:
    """One grammar text from a root expression and the rules it uses; checked by gbnf."""
    rules: dict[str, str] = {"root": root}
    for frag in fragments:
        rules.update(frag.rules)
    rules.update(extra or {})
    text = "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"
    gbnf.validate(text)
    return text


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call, with its argument rules."""

    name: str
    arguments: Fragment


# family -> (text before the calls, separator between calls, text after, args key)
CALL_SHAPES = {
    "hermes": ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>", "arguments"),
    "llama3": ("", "; ", "", "parameters"),
    "mistral": ("[TOOL_CALLS][", ", ", "]", "arguments"),
    "json": ('{"tool_calls": [', ", ", "]}", "arguments"),
}


def tool_calls_rules(family: str, tools: list[ToolSpec], parallel: bool) -> Fragment:
    """Rules for one or more calls to `tools` in the template family's markup."""
    before, sep, after, key = CALL_SHAPES.get(family, CALL_SHAPES["json"])
    rules: dict[str, str] = {}
    alts = []
    for i, tool in enumerate(tools):
        rules.update(tool.arguments.rules)
        head = json.dumps({"name": tool.name}, ensure_ascii=False)[:-1] + f', "{key}": '
        name = f"call-{i}"
        rules[name] = f'{literal(head)} {tool.arguments.root} "}}"'
        alts.append(name)
    rules["call"] = " | ".join(alts)
    parts = [literal(before)] if before else []
    parts.append("call")
    if parallel and family != "llama3":
        parts.append(f"({literal(sep)} call)*")
    if after:
        parts.append(literal(after))
    rules["tool-calls"] = " ".join(parts)
    return Fragment("tool-calls", rules)
