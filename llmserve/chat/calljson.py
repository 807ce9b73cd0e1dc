"""Call objects in streamed JSON: what the tool-call parsers share.

JsonValue passes a JSON value on as it arrives; CallObject streams one call object (name first,
then its arguments in pieces, when the model writes the usual `{"name": ..., "arguments": ...}`
order; otherwise the whole object once it is complete); CallObjects splits a run of call
objects. Results go to a CallSink (the parser), which turns them into OpenAI deltas.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

ARG_KEYS = ("arguments", "parameters")
# The usual shape, name first: once this much is seen the name is known and arguments stream.
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


class CallSink(Protocol):
    """Where scanned calls go: a tool-call parser."""

    def first_delta(self, name: str) -> None: ...
    def arguments(self, text: str) -> None: ...
    def end_call(self) -> None: ...
    def content(self, text: str) -> None: ...


def call_from_json(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) from a parsed call object in any shape models use, else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = next((obj[k] for k in ARG_KEYS if k in obj), {})
    if isinstance(args, str):  # arguments sent as a JSON-encoded string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return name, json.dumps(args, ensure_ascii=False)


class JsonValue:
    """Scans one JSON value as it streams; containers are passed on as they arrive."""

    def __init__(self) -> None:
        self.kind = ""  # "", "container", "string", "scalar"
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False
        self.held = ""
        self.rest = ""  # text after the value's end

    def feed(self, text: str) -> str:
        """The text to emit as arguments now (container values only)."""
        out: list[str] = []
        for i, ch in enumerate(text):
            if self.done:
                self.rest += text[i:]
                break
            if not self.kind:
                if ch.isspace():
                    continue
                self.kind = "container" if ch in "{[" else "string" if ch == '"' else "scalar"
            if self.kind == "scalar":
                if ch in ",}]" or ch.isspace():
                    self.done = True
                    self.rest += text[i:]
                    break
                else:
                    self.held += ch
                continue
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                    self.done = self.kind == "string"
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            if self.kind == "container":
                out.append(ch)
            else:
                self.held += ch
        return "".join(out)

    def close(self) -> str:
        """Arguments not yet emitted: a decoded string value or a scalar."""
        if self.kind == "string":
            try:
                decoded = json.loads(self.held)
            except ValueError:
                return self.held
            return decoded if isinstance(decoded, str) else self.held
        return self.held


class CallObject:
    """The JSON text of one call object: streams name then arguments when the shape allows."""

    def __init__(self, parser: CallSink):
        self.parser = parser
        self.raw = ""
        self.value: JsonValue | None = None

    def feed(self, text: str) -> None:
        if self.value is None:
            self.raw += text
            m = _CALL_HEAD.match(self.raw)
            if not m:
                return
            self.value = JsonValue()
            self.parser.first_delta(json.loads(m.group(1)))
            text = self.raw[m.end() :]
        self.parser.arguments(self.value.feed(text))

    def close(self) -> bool:
        """Finish the call; False if this was not a call (nothing was emitted for it)."""
        if self.value is not None:
            self.parser.arguments(self.value.close())
            self.parser.end_call()
            return True
        try:
            obj, _ = json.JSONDecoder().raw_decode(self.raw.strip())
        except ValueError:
            return False
        call = call_from_json(obj)
        if call is None:
            return False
        self.parser.first_delta(call[0])
        self.parser.arguments(call[1])
        self.parser.end_call()
        return True


class CallObjects:
    """A run of top-level JSON call objects separated by `,`, `;` or whitespace.

    Ends at `closer` (then drops any of `tail`) or at the first other character; the text
    from there on is content.
    """

    def __init__(self, parser: CallSink, closer: str = "", tail: str = ""):
        self.parser = parser
        self.closer = closer
        self.tail = tail
        self.call: CallObject | None = None
        self.raw = ""
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.ended = False

    def feed(self, text: str) -> str:
        """Consume text; return what follows the run (content), once it has ended."""
        start = 0
        for i, ch in enumerate(text):
            if self.ended:
                rest = text[i:]
                return rest.lstrip(self.tail + " \t\r\n") if self.tail else rest
            if self.call is None:
                if ch == "{":
                    self.call, self.raw, self.depth, start = CallObject(self.parser), "", 1, i
                elif ch.isspace() or ch in ",;":
                    continue
                elif self.closer and ch == self.closer:
                    self.ended = True
                else:
                    self.ended = True
                    return text[i:]
                continue
            if self.in_str:
                self.esc, self.in_str = (False, True) if self.esc else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self._chunk(text[start : i + 1])
                    self.close()
        if self.call is not None:
            self._chunk(text[start:])
        return ""

    def _chunk(self, text: str) -> None:
        assert self.call is not None
        self.raw += text
        self.call.feed(text)

    def close(self) -> None:
        """End the current object (at its closing brace, or unfinished at end of output)."""
        # NOTE: a call cut off by max_tokens is dropped rather than leaked as content.
        cut_off = self.depth > 0 and _call_start(self.raw)
        if self.call is not None and not self.call.close() and not cut_off:
            self.parser.content(self.raw)
        self.call = None


def _call_start(text: str) -> bool:
    """Whether text looks like the beginning of a call object."""
    compact = "".join(text.split())
    heads = ('{"name"', '{"function"', '{"type":"function"')
    return any(compact.startswith(h) or h.startswith(compact) for h in heads)
