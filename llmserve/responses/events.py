"""A response object built from a generation's events, and the semantic stream events.

One builder serves both shapes: a non-streamed response is the builder's final object, a
streamed one also sends every event the builder returns (in order, numbered by
`sequence_number`). Output items: a `message` with one `output_text` part per run of text,
a `function_call` per tool call (a `custom_tool_call` for a custom tool's), a `reasoning`
item for thinking text (the hook below).
"""

from __future__ import annotations

import copy
import time
from typing import Any

from llmserve.chat.custom_tools import InputStream
from llmserve.chat.tools import ToolCallDelta
from llmserve.output import Finished, ReasoningDelta
from llmserve.responses.convert import new_id
from llmserve.responses.tools import ToolSet

Event = dict[str, Any]


def reasoning_text(event: object) -> str | None:
    """The thinking text an event carries, if any (a ReasoningDelta of the reasoning parser).

    It becomes `reasoning` output items and `response.reasoning_text.delta` events;
    `Finished.reasoning_tokens` feeds usage.output_tokens_details.reasoning_tokens. Reasoning
    input items are not rendered back into the prompt (convert.chat_messages skips them)."""
    return event.text if isinstance(event, ReasoningDelta) else None


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int, reasoning_tokens: int,
          cache_on: bool) -> dict[str, Any]:
    """Responses usage; cache_write_tokens: prompt tokens the prefix cache stores anew."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": cached_tokens,
            "cache_write_tokens": max(prompt_tokens - cached_tokens, 0) if cache_on else 0,
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + output_tokens,
    }


class ResponseBuilder:
    """Feed it text, tool-call and reasoning pieces; each call returns the stream events."""

    def __init__(self, response: dict[str, Any], tools: ToolSet | None = None):
        self.response = response  # status "in_progress", output []
        self.output: list[dict[str, Any]] = response["output"]
        self.tools = tools or ToolSet()  # the names calls go back under
        self._seq = 0
        self._open: dict[str, Any] | None = None  # the item receiving pieces now
        self._calls: dict[int, dict[str, Any]] = {}  # ToolCallDelta.index -> its item
        self._inputs: dict[str, InputStream] = {}  # a custom call's item id -> its input

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def start(self) -> list[Event]:
        """response.created and response.in_progress."""
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def _add(self, item: dict[str, Any]) -> list[Event]:
        events = self._close()
        self.output.append(item)
        self._open = item
        events.append(self._event("response.output_item.added",
                                  output_index=len(self.output) - 1, item=copy.deepcopy(item)))
        return events

    def _part_fields(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item),
                "content_index": 0}

    def text(self, text: str) -> list[Event]:
        """Answer text: opens a message item (and its output_text part) when needed."""
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
            events += self._add(item)
            item["content"].append({"type": "output_text", "text": "", "annotations": []})
            events.append(self._event("response.content_part.added", **self._part_fields(item),
                                      part={"type": "output_text", "text": "",
                                            "annotations": []}))
        if text:
            item["content"][0]["text"] += text
            events.append(self._event("response.output_text.delta", **self._part_fields(item),
                                      delta=text, logprobs=[]))
        return events

    def reasoning(self, text: str) -> list[Event]:
        """Thinking text: a reasoning item with one reasoning_text part (see reasoning_text)."""
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [],
                    "status": "in_progress", "content": []}
            events += self._add(item)
            item["content"].append({"type": "reasoning_text", "text": ""})
            events.append(self._event("response.content_part.added", **self._part_fields(item),
                                      part={"type": "reasoning_text", "text": ""}))
        if text:
            item["content"][0]["text"] += text
            events.append(self._event("response.reasoning_text.delta",
                                      **self._part_fields(item), delta=text))
        return events

    def call(self, delta: ToolCallDelta) -> list[Event]:
        """A tool-call piece: the first (with id and name) opens a function_call item, or a
        custom_tool_call item for a custom tool; a namespace tool's call names its namespace."""
        events: list[Event] = []
        item = self._calls.get(delta.index)
        if item is None:
            target = self.tools.target(delta.name or "")
            call_id = delta.id or new_id("call")
            if target.custom:
                item = {"id": new_id("ctc"), "type": "custom_tool_call",
                        "status": "in_progress", "call_id": call_id, "name": target.name,
                        "input": ""}
                self._inputs[item["id"]] = InputStream()
            else:
                item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                        "call_id": call_id, "name": target.name, "arguments": ""}
            if target.namespace is not None:
                item["namespace"] = target.namespace
            self._calls[delta.index] = item
            events += self._add(item)
        if item["type"] == "custom_tool_call":
            events += self._input(item, self._inputs[item["id"]].feed(delta.arguments))
        elif delta.arguments:
            item["arguments"] += delta.arguments
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=self.output.index(item),
                                      delta=delta.arguments))
        return events

    def _input(self, item: dict[str, Any], text: str) -> list[Event]:
        if not text:
            return []
        item["input"] += text
        return [self._event("response.custom_tool_call_input.delta", item_id=item["id"],
                            output_index=self.output.index(item), delta=text)]

    def _close(self, status: str = "completed") -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        events: list[Event] = []
        index = self.output.index(item)
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            done = "output_text" if item["type"] == "message" else "reasoning_text"
            events.append(self._event(f"response.{done}.done", **self._part_fields(item),
                                      text=part["text"],
                                      **({"logprobs": []} if done == "output_text" else {})))
            events.append(self._event("response.content_part.done", **self._part_fields(item),
                                      part=copy.deepcopy(part)))
        elif item["type"] == "custom_tool_call":
            rest, whole = self._inputs.pop(item["id"]).finish()
            events += self._input(item, rest)
            item["input"] = whole
            events.append(self._event("response.custom_tool_call_input.done",
                                      item_id=item["id"], output_index=index, input=whole))
        else:
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      arguments=item["arguments"]))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=copy.deepcopy(item)))
        return events

    def finish(self, finished: Finished, usage_: dict[str, Any]) -> list[Event]:
        """Close the open item; response.completed (or .incomplete at max_output_tokens)."""
        truncated = finished.finish_reason == "length"
        events: list[Event] = []
        if not self.output:
            events += self.text("")  # NOTE: always a message, so output_text is a string
        events += self._close("incomplete" if truncated else "completed")
        self.response.update(status="incomplete" if truncated else "completed",
                             usage=usage_, completed_at=int(time.time()))
        if truncated:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        kind = "response.incomplete" if truncated else "response.completed"
        events.append(self._event(kind, response=self._snapshot()))
        return events

    def fail(self, message: str, code: str = "server_error") -> list[Event]:
        """After the stream started: an `error` event, then response.failed (never a cut)."""
        events = self._close("incomplete")
        self.response.update(status="failed", error={"code": code, "message": message})
        events.append(self._event("error", code=code, message=message, param=None))
        events.append(self._event("response.failed", response=self._snapshot()))
        return events
