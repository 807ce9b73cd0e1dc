"""Anthropic Messages output: content blocks (text, thinking, tool_use), the whole Message, the
stream's events in Anthropic's order, and error bodies.

One MessageBuilder serves both: every part of the output goes through it, the stream sends the
events it returns, the JSON response takes `message()` at the end. Stream order:
message_start, ping, (content_block_start, content_block_delta..., content_block_stop)...,
message_delta (stop_reason, usage), message_stop.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass
from typing import Any

from llmserve.chat.tools import ToolCallDelta

logger = logging.getLogger(__name__)

Event = dict[str, Any]
_ALPHABET = string.ascii_letters + string.digits

# HTTP status -> Anthropic error type (https://docs.anthropic.com/en/api/errors)
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, Anthropic's error shape."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def message_id() -> str:
    """`msg_` and 24 random letters and digits."""
    return "msg_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def tool_use_id(call_id: str | None) -> str:
    """`toolu_` ids for our parsers' `call_` ones (the same random part)."""
    tail = (call_id or "").removeprefix("call_")
    return "toolu_" + (tail or "".join(secrets.choice(_ALPHABET) for _ in range(24)))


@dataclass(frozen=True)
class Thinking:
    """A piece of the model's reasoning (a thinking block): the reasoning parser's output."""

    text: str


Part = str | Thinking | ToolCallDelta  # str: visible text


def usage(input_tokens: int, output_tokens: int, cache_read: int, cache_creation: int
          ) -> dict[str, int]:
    """Anthropic usage: input_tokens excludes the tokens read from or written to the cache."""
    return {
        "input_tokens": max(0, input_tokens - cache_read - cache_creation),
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_creation,
    }


class MessageBuilder:
    """Content blocks from output parts, as stream events and as the final Message."""

    def __init__(self, id_: str, model: str):
        self.id = id_
        self.model = model
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the block receiving deltas, if any
        self._arguments: dict[int, str] = {}  # tool_use block index -> JSON text so far
        self._tool_index: int | None = None  # our parser's call index of the open tool block

    def start(self, usage_now: dict[str, int]) -> list[Event]:
        """message_start (the Message without content and stop_reason) and a ping."""
        message = self._message(None, None, usage_now)
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def feed(self, part: Part) -> list[Event]:
        """Events for one part of the output."""
        if isinstance(part, ToolCallDelta):
            return self._tool(part)
        kind, text = ("thinking", part.text) if isinstance(part, Thinking) else ("text", part)
        if not text:
            return []
        events = [] if self._open == kind else self._begin(
            {"type": "text", "text": ""} if kind == "text"
            else {"type": "thinking", "thinking": "", "signature": ""}
        )
        index = len(self.blocks) - 1
        self.blocks[index][kind] += text
        delta = ({"type": "text_delta", "text": text} if kind == "text"
                 else {"type": "thinking_delta", "thinking": text})
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def _tool(self, part: ToolCallDelta) -> list[Event]:
        events: list[Event] = []
        if part.id is not None or self._open != "tool_use" or part.index != self._tool_index:
            events = self._begin({"type": "tool_use", "id": tool_use_id(part.id),
                                  "name": part.name or "", "input": {}})
            self._tool_index = part.index
            self._arguments[len(self.blocks) - 1] = ""
        index = len(self.blocks) - 1
        if part.arguments:
            self._arguments[index] += part.arguments
            events.append({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta",
                                     "partial_json": part.arguments}})
        return events

    def _begin(self, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        self.blocks.append(block)
        self._open = block["type"]
        start = dict(block)
        events.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                       "content_block": start})
        return events

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index = len(self.blocks) - 1
        if self._open == "tool_use":
            self.blocks[index]["input"] = _parse_input(self._arguments.get(index, ""))
        self._open = None
        return [{"type": "content_block_stop", "index": index}]

    def finish(self, stop_reason: str, stop_sequence: str | None, usage_end: dict[str, int]
               ) -> list[Event]:
        """The last open block's stop, message_delta and message_stop."""
        events = self._close()
        events.append({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage_end,
        })
        events.append({"type": "message_stop"})
        return events

    def message(self, stop_reason: str, stop_sequence: str | None, usage_end: dict[str, int]
                ) -> dict[str, Any]:
        """The whole Message (non-streaming responses)."""
        self._close()
        return self._message(stop_reason, stop_sequence, usage_end)

    def _message(self, stop_reason: str | None, stop_sequence: str | None,
                 usage_now: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [dict(b) for b in self.blocks] if stop_reason else [],
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage_now,
        }


def _parse_input(arguments: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        logger.warning("tool call arguments are not valid JSON: %.200s", arguments)
        return {}
    return value if isinstance(value, dict) else {"value": value}


def sse(event: Event) -> dict[str, str]:
    """One event as sse-starlette's dict: Anthropic's `event:` line plus its JSON."""
    return {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
