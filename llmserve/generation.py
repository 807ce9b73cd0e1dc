"""A running generation as its consumers see it (routes, Responses, Messages): header data,
then the events of n choices, whichever backend produces them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmserve.chat.tools import ToolCallDelta
from llmserve.output import Finished, ReasoningDelta, Started, TextDelta, TokenLogprob

if TYPE_CHECKING:
    from llmserve.scheduler import EventStream


@dataclass
class Message:
    """A whole chat reply: content, tool calls in OpenAI's shape, how it finished, and its
    reasoning (None: the reply had none)."""

    content: str
    tool_calls: list[dict[str, Any]]
    finished: Finished
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    reasoning: str | None = None


class Generation:
    """A running generation: header data, then TextDelta/ReasoningDelta/ToolCallDelta events,
    and one Finished per choice (each event carries its choice index)."""

    def __init__(self, id_: str, started: Started, stream: EventStream, n: int = 1):
        self.id = id_
        self.created = int(time.time())
        self.model = started.model
        self.prompt_tokens = started.prompt_tokens
        self.cached_tokens = started.cached_tokens
        self.n = n
        self._stream = stream
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]  # filled as it runs

    def cancel(self) -> None:
        """Stop generating within a token."""
        self._stream.cancel()

    async def __aiter__(
        self,
    ) -> AsyncIterator[TextDelta | ReasoningDelta | ToolCallDelta | Finished]:
        # NOTE: the request goes on after the last Finished (it saves the prompt cache); the
        # response does not wait for that.
        done: set[int] = set()
        async for event in self._stream:
            if isinstance(event, TextDelta) and event.logprobs:
                self.logprobs[event.choice].extend(event.logprobs)
            elif isinstance(event, Finished):
                done.add(event.choice)
                if event.choice == 0 and event.cached_tokens is not None:
                    self.cached_tokens = event.cached_tokens  # final once the prompt is in
                if event.choice == 0 and event.prompt_tokens is not None:
                    self.prompt_tokens = event.prompt_tokens  # a proxied backend's usage
            yield event
            if len(done) >= self.n:
                return

    async def collect(self) -> tuple[str, Finished]:
        """Wait for the whole text and the finish event (choice 0)."""
        texts, finishes = await self.collect_texts()
        return texts[0], finishes[0]

    async def collect_texts(self) -> tuple[list[str], list[Finished]]:
        """Every choice's whole text and Finished."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        finishes = [Finished("stop", 0, i) for i in range(self.n)]
        async for event in self:
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
            elif isinstance(event, Finished):
                finishes[event.choice] = event
        return ["".join(p) for p in parts], finishes

    async def collect_message(self) -> Message:
        """Wait for the whole reply (choice 0), tool calls assembled from their deltas."""
        return (await self.collect_messages())[0]

    async def collect_messages(self) -> list[Message]:
        """Every choice's whole reply."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        thoughts: list[list[str]] = [[] for _ in range(self.n)]
        calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(self.n)]
        finishes = [Finished("stop", 0, i) for i in range(self.n)]
        async for event in self:
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
            elif isinstance(event, ReasoningDelta):
                thoughts[event.choice].append(event.text)
            elif isinstance(event, ToolCallDelta):
                call = calls[event.choice].setdefault(event.index, {
                    "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                })
                call["function"]["arguments"] += event.arguments
            elif isinstance(event, Finished):
                finishes[event.choice] = event
        return [Message("".join(parts[i]), [calls[i][k] for k in sorted(calls[i])], finishes[i],
                        self.logprobs[i], "".join(thoughts[i]) or None)
                for i in range(self.n)]
