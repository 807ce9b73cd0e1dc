"""Chat completions' tool calls on the wire: function calls as before, calls of custom tools as
`{"type": "custom", "id", "custom": {"name", "input"}}` (their input streamed as it decodes)."""

from __future__ import annotations

from typing import Any

from llmserve.chat.custom_tools import InputStream, freeform_input
from llmserve.chat.tools import ToolCallDelta
from llmserve.schemas import ChatCompletionRequest, CustomToolDefinition


def custom_tool_names(req: ChatCompletionRequest) -> set[str]:
    """The names of the request's custom tools."""
    return {t.custom.name for t in req.tools or [] if isinstance(t, CustomToolDefinition)}


def function_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed tool call: id, type and name only in a call's first delta."""
    call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        call.update(id=delta.id, type="function")
        call["function"]["name"] = delta.name
    return {"tool_calls": [call]}


class ChatToolCalls:
    """Shapes one request's tool calls; custom ones by name (see custom_tool_names)."""

    def __init__(self, custom: set[str]):
        self.custom = custom
        self._streams: dict[tuple[int, int], InputStream] = {}  # (choice, index) -> input

    def message(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A whole reply's tool calls."""
        return [self._whole(c) for c in calls]

    def _whole(self, call: dict[str, Any]) -> dict[str, Any]:
        fn = call["function"]
        if fn["name"] not in self.custom:
            return call
        return {"id": call["id"], "type": "custom",
                "custom": {"name": fn["name"], "input": freeform_input(fn["arguments"])}}

    def delta(self, delta: ToolCallDelta) -> dict[str, Any] | None:
        """A streamed piece as a chunk's delta (None: a custom call's piece decoded nothing)."""
        key = (delta.choice, delta.index)
        stream = self._streams.get(key)
        if stream is None and (delta.id is None or delta.name not in self.custom):
            return function_call_delta(delta)
        if stream is None:
            stream = self._streams[key] = InputStream()
            text = stream.feed(delta.arguments)
            return {"tool_calls": [{"index": delta.index, "id": delta.id, "type": "custom",
                                    "custom": {"name": delta.name, "input": text}}]}
        text = stream.feed(delta.arguments)
        if not text:
            return None
        return {"tool_calls": [{"index": delta.index, "custom": {"input": text}}]}

    def flush(self, choice: int) -> list[dict[str, Any]]:
        """At a choice's end: the input its custom calls have not streamed yet."""
        out = []
        for key in sorted(k for k in self._streams if k[0] == choice):
            rest, _ = self._streams.pop(key).finish()
            if rest:
                out.append({"tool_calls": [{"index": key[1], "custom": {"input": rest}}]})
        return out
