"""Custom (freeform) tools: offered to the model as a function with one string argument, their
calls read back as the freeform text.

The model sees `{"input": {"type": "string"}}` and a description that says so (plus the
tool's grammar, shown, not enforced: a later change moves grammars to llguidance). A call's
arguments `{"input": "..."}` become the call's `input`; InputStream decodes that string while
the arguments still stream, so clients get the text piece by piece.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmserve.schemas import (
    FREEFORM_ARGUMENT,
    CustomToolSpec,
    FunctionDefinition,
    ToolDefinition,
)

GRAMMAR_SHOWN = 4000  # characters of a tool's grammar the description shows at most
_OPENING = re.compile(r'\s*\{\s*"' + FREEFORM_ARGUMENT + r'"\s*:\s*"')


def freeform_description(spec: CustomToolSpec) -> str:
    """The tool's description plus how to pass its freeform input (and its format)."""
    parts = [spec.description.strip()] if spec.description else []
    parts.append(f"This tool takes freeform text: pass all of it, as is, in the "
                 f"`{FREEFORM_ARGUMENT}` string.")
    fmt = spec.format or {}
    definition = fmt.get("definition")
    if fmt.get("type") == "grammar" and isinstance(definition, str) and definition.strip():
        syntax = fmt.get("syntax") or "grammar"
        if len(definition) <= GRAMMAR_SHOWN:
            parts.append(f"The text must match this {syntax} grammar:\n{definition.strip()}")
        else:
            parts.append(f"The text must match the tool's {syntax} grammar.")
    return "\n\n".join(parts)


def as_function(spec: CustomToolSpec) -> ToolDefinition:
    """The function a custom tool is offered as."""
    return ToolDefinition(type="function", function=FunctionDefinition(
        name=spec.name, description=freeform_description(spec),
        parameters={"type": "object",
                    "properties": {FREEFORM_ARGUMENT: {
                        "type": "string", "description": "The freeform input."}},
                    "required": [FREEFORM_ARGUMENT]},
    ))


def freeform_input(arguments: str) -> str:
    """A whole call's arguments as the freeform input: the `input` string, a bare JSON
    string, or (a model that ignored the schema) the arguments text itself."""
    try:
        value: Any = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(FREEFORM_ARGUMENT), str):
        return str(value[FREEFORM_ARGUMENT])
    if isinstance(value, dict) and len(value) == 1:
        only = next(iter(value.values()))
        if isinstance(only, str):
            return only
    if isinstance(value, str):
        return value
    return arguments


class InputStream:
    """Decodes the `input` string of a custom call's arguments as they stream in."""

    def __init__(self) -> None:
        self.arguments = ""
        self.sent = ""  # the input text handed out so far

    def feed(self, piece: str) -> str:
        """The input text that this piece of arguments completes ("" when none yet)."""
        self.arguments += piece
        match = _OPENING.match(self.arguments)
        if match is None:
            return ""
        text = _decoded_prefix(self.arguments[match.end():])
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += new
        return new

    def finish(self) -> tuple[str, str]:
        """(the rest of the input not handed out yet, the whole input)."""
        whole = freeform_input(self.arguments)
        rest = whole[len(self.sent):] if whole.startswith(self.sent) else ""
        self.sent += rest
        return rest, whole


def _decoded_prefix(body: str) -> str:
    """The longest decodable start of a JSON string's body (up to its closing quote)."""
    end = 0
    i = 0
    while i < len(body):
        c = body[i]
        if c == '"':
            end = i
            break
        if c == "\\":
            if i + 1 >= len(body):
                break
            step = 6 if body[i + 1] == "u" else 2
            if body[i + 1] == "u" and 0xD800 <= _hex(body[i + 2:i + 6]) <= 0xDBFF:
                step = 12  # NOTE: a surrogate pair decodes only with both halves
            if i + step > len(body):
                break
            i += step
        else:
            i += 1
        end = i
    try:
        return str(json.loads('"' + body[:end] + '"'))
    except ValueError:
        return ""


def _hex(digits: str) -> int:
    try:
        return int(digits, 16) if len(digits) == 4 else -1
    except ValueError:
        return -1
