"""Tool calls in model output: streaming parsers, one per template family, in a registry.

A parser is fed the generated text piece by piece and returns content text (str) and
ToolCallDelta pieces in OpenAI's streaming shape: the first delta of a call carries its id and
function name, later ones carry pieces of the arguments JSON. Markup never reaches the content.

Families (see `detect_family`):
  hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Qwen, our ChatML, Gemma)
  llama3   [<|python_tag|>]{"name": ..., "parameters": {...}}       (Llama 3.1+, JSON tool calling)
  mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
  json     {"tool_calls": [{"name": ..., "arguments": {...}}]}, a bare call object, or a list
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass

from llmserve.chat.calljson import CallObject, CallObjects, JsonValue

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call: `id` and `name` only in the first piece of each call."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    choice: int = 0  # which of the request's n choices


Piece = str | ToolCallDelta


def new_call_id() -> str:
    """`call_` and 24 random letters and digits, like OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _call_key(name: str, arguments: str) -> tuple[str, str]:
    """A call's identity: its name and its arguments as canonical JSON."""
    try:
        return name, json.dumps(json.loads(arguments or "{}"), sort_keys=True)
    except ValueError:
        return name, arguments


class ToolCallParser:
    """Base: content with held-back whitespace, call numbering. Subclasses implement _feed.

    `done` turns true when the output should end: `max_calls` calls are complete (1 when the
    request does not allow parallel calls), or the model began repeating a call it already
    made, word for word (small models loop on `<tool_call>` until max_tokens). The calls after
    the first are held back until complete, so a repeated one is dropped unseen.
    """

    def __init__(self, max_calls: int | None = None) -> None:
        self._out: list[Piece] = []
        self.calls = 0
        self.max_calls = max_calls
        self.done = False
        self._ws = ""
        self._after_call = False
        self._open = False
        self._name = ""
        self._args = ""
        self._held: list[Piece] | None = None  # a later call's deltas, until it is complete
        self._seen: set[tuple[str, str]] = set()

    def feed(self, text: str) -> list[Piece]:
        """Content and tool-call pieces for the next piece of generated text."""
        if text and not self.done:
            self._feed(text)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Piece]:
        """Everything still held back, at the end of generation."""
        if not self.done:
            self._finish()
            if self._held:  # cut off mid-call (max_tokens): what streamed before, as before
                self._out += self._held
        self._held = None
        if self._ws and not self.calls:
            self._out.append(self._ws)
        self._ws = ""
        out, self._out = self._out, []
        return out

    def _feed(self, text: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def content(self, text: str) -> None:
        """Emit content; whitespace next to tool calls is dropped."""
        if self._after_call:
            text = text.lstrip()
        if not text:
            return
        self._after_call = False
        body = text.rstrip()
        if body:
            self._out.append(self._ws + body)
            self._ws = text[len(body) :]
        else:
            self._ws += text

    def first_delta(self, name: str) -> None:
        if self.done:
            return
        self._ws = ""
        self._open = True
        self._name, self._args = name, ""
        delta = ToolCallDelta(self.calls, new_call_id(), name, "")
        if self.calls:
            self._held = [delta]
        else:
            self._out.append(delta)

    def arguments(self, text: str) -> None:
        if text and not self.done:
            self._args += text
            delta = ToolCallDelta(self.calls, arguments=text)
            (self._held if self._held is not None else self._out).append(delta)

    def end_call(self) -> None:
        if not self._open or self.done:
            return
        self._open = False
        self._after_call = True
        held, self._held = self._held, None
        key = _call_key(self._name, self._args)
        if key in self._seen:
            self.done = True  # a repeat: drop it and end the output
            return
        self._seen.add(key)
        self._out += held or []
        self.calls += 1
        if self.max_calls is not None and self.calls >= self.max_calls:
            self.done = True


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesParser(ToolCallParser):
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buf = ""
        self._call: CallObject | None = None
        self._block = ""
        self._block_ws = ""

    def _feed(self, text: str) -> None:
        self._buf += text
        while True:
            marker = self.END if self._call else self.START
            idx = self._buf.find(marker)
            if idx < 0:
                cut = len(self._buf) - _held_prefix(self._buf, marker)
                ready, self._buf = self._buf[:cut], self._buf[cut:]
                self._emit(ready)
                return
            self._emit(self._buf[:idx])
            self._buf = self._buf[idx + len(marker) :]
            if self._call is None:
                # NOTE: whitespace before a block belongs to it: dropped with a call, kept
                # if the block turns out to be text.
                self._call, self._block = CallObject(self), ""
                self._block_ws, self._ws = self._ws, ""
            else:
                self._close()

    def _emit(self, text: str) -> None:
        if self._call is None:
            self.content(text)
        else:
            self._block += text
            self._call.feed(text)

    def _close(self) -> None:
        assert self._call is not None
        if not self._call.close():
            self._ws = self._block_ws
            self.content(self.START + self._block + self.END)
        self._call = None

    def _finish(self) -> None:
        self._emit(self._buf)
        self._buf = ""
        if self._call is not None:  # NOTE: many models end the last call at EOS, unclosed
            # A call cut off mid-JSON (max_tokens) is dropped; other text stays content.
            if not self._call.close() and not self._block.lstrip().startswith("{"):
                self._ws = self._block_ws
                self.content(self.START + self._block)
            self._call = None


class _JsonStartParser(ToolCallParser):
    """Tool calls only at the very start of the output, after one of `openers`."""

    openers: tuple[str, ...] = ()

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._head = ""
        self._objects: CallObjects | None = None
        self._text = False  # decided: plain content

    def _opener(self, head: str) -> str | None:
        """The opener head starts with; "" while it may still become one; None if it cannot."""
        compact = "".join(head.split())
        for opener in self.openers:
            if compact.startswith(opener):
                return opener
            if opener.startswith(compact):
                return ""
        return None

    def _objects_for(self, opener: str) -> CallObjects:
        return CallObjects(self)

    def _feed(self, text: str) -> None:
        if self._text:
            self.content(text)
            return
        if self._objects is None:
            self._head += text
            opener = self._opener(self._head)
            if opener == "":
                return
            if opener is None:
                self._text = True
                self.content(self._head)
                return
            self._objects, text = self._objects_for(opener), _after(self._head, opener)
        rest = self._objects.feed(text)
        if rest:
            self._text = True
            self.content(rest)

    def _finish(self) -> None:
        if self._objects is not None:
            self._objects.close()
        elif not self._text and self._head:
            self.content(self._head)


def _after(head: str, opener: str) -> str:
    """head with the opener (matched ignoring whitespace) cut off."""
    need = len("".join(opener.split()))
    seen = 0
    for i, ch in enumerate(head):
        if not ch.isspace():
            seen += 1
        if seen == need:
            return head[i + 1 :] if opener[-1] != "{" else head[i:]
    return ""


class Llama3Parser(_JsonStartParser):
    """Llama 3.1+: `{"name": ..., "parameters": ...}` as the whole reply (`;` between calls)."""

    openers = ("<|python_tag|>", "{")


class JsonParser(_JsonStartParser):
    """Generic: `{"tool_calls": [...]}`, a list of calls, or one bare call object."""

    openers = ('{"tool_calls":[', "[", "{")

    def _objects_for(self, opener: str) -> CallObjects:
        if opener == "{":
            return CallObjects(self)
        return CallObjects(self, closer="]", tail="}" if opener.startswith("{") else "")


class MistralParser(ToolCallParser):
    """`[TOOL_CALLS]` then a JSON list of calls, or `name[ARGS]{...}` (newer templates)."""

    START, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._buf = ""
        self._mode = "text"  # text | head | list | name | args
        self._objects: CallObjects | None = None
        self._value: JsonValue | None = None

    def _feed(self, text: str) -> None:
        self._buf += text
        while self._buf:
            if self._mode == "text":
                idx = self._buf.find(self.START)
                if idx < 0:
                    keep = _held_prefix(self._buf, self.START)
                    self.content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self.content(self._buf[:idx])
                self._buf, self._mode = self._buf[idx + len(self.START) :], "head"
            elif self._mode == "head":
                stripped = self._buf.lstrip()
                if not stripped:
                    return
                self._mode = "list" if stripped[0] == "[" else "name"
                self._buf = stripped[1:] if self._mode == "list" else stripped
                self._objects = CallObjects(self, closer="]") if self._mode == "list" else None
            elif self._mode == "list":
                assert self._objects is not None
                rest, self._buf = self._objects.feed(self._buf), ""
                if self._objects.ended:
                    self._objects, self._mode, self._buf = None, "text", rest
            elif self._mode == "name":
                idx = self._buf.find(self.ARGS)
                if idx < 0:
                    return
                name = self._buf[:idx].split(self.CALL_ID)[0].strip()
                self.first_delta(name)
                self._value, self._mode = JsonValue(), "args"
                self._buf = self._buf[idx + len(self.ARGS) :]
            else:
                assert self._value is not None
                self.arguments(self._value.feed(self._buf))
                self._buf = ""
                if not self._value.done:
                    return
                self.arguments(self._value.close())
                self.end_call()
                self._buf, self._value, self._mode = self._value.rest, None, "text"

    def _finish(self) -> None:
        if self._mode == "text":
            self.content(self._buf)
        elif self._mode == "list" and self._objects is not None:
            self._objects.close()
        elif self._mode == "args" and self._value is not None:
            self.arguments(self._value.close())
            self.end_call()
        self._buf = ""


class PlainText(ToolCallParser):
    """No tools: every piece is content, unchanged."""

    def _feed(self, text: str) -> None:
        self._out.append(text)

    def _finish(self) -> None:
        pass


PARSERS: dict[str, Callable[..., ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3": Llama3Parser,
    "mistral": MistralParser,
    "json": JsonParser,
}


def detect_family(template: str) -> str:
    """The tool-call family a chat template's markup belongs to."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3"
    return "json"


def make_parser(family: str | None, *, max_calls: int | None = None) -> ToolCallParser:
    """The parser for a family (None: no tools, plain text); max_calls=1 for requests that
    do not allow parallel tool calls."""
    if family is None:
        return PlainText()
    return PARSERS.get(family, JsonParser)(max_calls=max_calls)
