"""ResponsesService: POST /v1/responses on top of ChatService, plus the stored responses.

create: check the request -> previous_response_id's record (history) -> a chat completion
request (convert.py) -> ChatService.chat (the same plan, scheduler and prefix cache as chat
completions) -> a ResponseRun that turns the generation's events into the response object and,
streamed, its semantic events (events.py) -> the finished response goes to the store.

NOTE: the prompt of a continued conversation renders history + new input with the same
template, so it starts with the previous turn's prompt + output and the prefix cache supplies
that KV (usage.input_tokens_details.cached_tokens).

Ownership: with API keys, each record holds `owner`, the id of the key that made it
(http/auth.key_id, a sha256, never the key); every other key gets the same 404 as an unknown
id on get, input_items, delete and previous_response_id. Records without an owner (written by
versions before it, or while no keys were set) are then nobody's: 404 to every key. Without
keys (owner None) the server is single-tenant and every record is readable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from llmserve.errors import InvalidRequestError, LlmserveError, NotFoundError
from llmserve.output import Finished, TextDelta
from llmserve.responses import convert
from llmserve.responses.events import Event, ResponseBuilder, reasoning_text, usage
from llmserve.responses.schemas import InputItemsQuery, ResponsesRequest
from llmserve.responses.store import ResponseStore
from llmserve.responses.tools import tool_set
from llmserve.service import ChatService, Generation, ToolCallDelta

logger = logging.getLogger(__name__)


class ResponseNotFoundError(NotFoundError):
    code = "response_not_found"


class ResponseRun:
    """One response being generated: iterate events() (streamed) or await collect()."""

    def __init__(self, gen: Generation, builder: ResponseBuilder, record: dict[str, Any],
                 store: ResponseStore | None, cache_on: bool):
        self.gen = gen
        self.builder = builder
        self.record = record
        self._store = store
        self._cache_on = cache_on

    @property
    def response(self) -> dict[str, Any]:
        return self.builder.response

    async def _pieces(self) -> AsyncIterator[Event]:
        """Events from the generation's pieces; raises the generation's errors."""
        b = self.builder
        finished: Finished | None = None
        async for event in self.gen:
            thought = reasoning_text(event)
            if thought is not None:
                for e in b.reasoning(thought):
                    yield e
            elif isinstance(event, TextDelta):
                for e in b.text(event.text):
                    yield e
            elif isinstance(event, ToolCallDelta):
                for e in b.call(event):
                    yield e
            elif isinstance(event, Finished):
                finished = event
        if finished is None:
            raise LlmserveError("the generation ended before it finished")
        reasoning_tokens = int(getattr(finished, "reasoning_tokens", 0) or 0)
        use = usage(self.gen.prompt_tokens, self.gen.cached_tokens,
                    finished.completion_tokens, reasoning_tokens, self._cache_on)
        for e in b.finish(finished, use):
            yield e
        if self._store is not None:
            self._store.put({**self.record, "response": self.response})

    async def events(self) -> AsyncIterator[Event]:
        """Every stream event in order; a failure after the start ends in response.failed."""
        for e in self.builder.start():
            yield e
        try:
            async for e in self._pieces():
                yield e
        except LlmserveError as exc:
            logger.warning("response %s failed: %s", self.response["id"], exc.message)
            for e in self.builder.fail(exc.message, exc.code or "server_error"):
                yield e
        except Exception as exc:
            logger.exception("response %s failed", self.response["id"])
            for e in self.builder.fail(f"internal error: {exc}"):
                yield e

    async def collect(self) -> dict[str, Any]:
        """The finished response object (errors raise, as for chat completions)."""
        async for _ in self._pieces():
            pass
        return self.response


class ResponsesService:
    """Creates, stores, retrieves and deletes responses."""

    def __init__(self, chat: ChatService, store: ResponseStore):
        self.chat = chat
        self.store = store

    def _record(self, response_id: str, owner: str | None,
                param: str | None = None) -> dict[str, Any]:
        record = self.store.get(response_id)
        # NOTE: another key's record answers exactly like a missing one, so ids cannot be probed
        if record is None or (owner is not None and record.get("owner") != owner):
            raise ResponseNotFoundError(f"response {response_id!r} not found", param=param)
        return record

    async def create(self, req: ResponsesRequest, owner: str | None = None) -> ResponseRun:
        """Start a response; raises every request error before any output exists."""
        convert.check_unsupported(req)
        assert req.input is not None
        items = convert.input_items(req.input)
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            prev = self._record(req.previous_response_id, owner, "previous_response_id")
            history = [*prev["history"], *prev["input"], *prev["response"]["output"]]
        tools = tool_set(req.tools)
        chat_req = convert.chat_request(req, history, items, tools)
        try:
            gen = await self.chat.chat(chat_req)
        except InvalidRequestError as exc:
            exc.param = convert.responses_param(exc.param)
            raise
        response = _skeleton(req, gen)
        record = {"owner": owner, "history": history, "input": items}
        store = self.store if req.store else None
        cache_on = self.chat.settings.prompt_cache != "off"
        return ResponseRun(gen, ResponseBuilder(response, tools), record, store, cache_on)

    def get(self, response_id: str, owner: str | None = None) -> dict[str, Any]:
        """A stored response object (404 when unknown, deleted, or another key's)."""
        response: dict[str, Any] = self._record(response_id, owner)["response"]
        return response

    def delete(self, response_id: str, owner: str | None = None) -> dict[str, Any]:
        """Forget a stored response (404 when unknown or another key's)."""
        self._record(response_id, owner)
        if not self.store.delete(response_id):
            raise ResponseNotFoundError(f"response {response_id!r} not found")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def input_items(self, response_id: str, query: InputItemsQuery,
                    owner: str | None = None) -> dict[str, Any]:
        """The items the response was generated from (earlier turns' too), paginated."""
        record = self._record(response_id, owner)
        items = [*record["history"], *record["input"]]
        if query.order == "desc":
            items.reverse()
        ids = [item.get("id") for item in items]
        for cursor, name in ((query.after, "after"), (query.before, "before")):
            if cursor is not None and cursor not in ids:
                raise InvalidRequestError(f"no item {cursor!r} in this response's input",
                                          param=name)
        start = ids.index(query.after) + 1 if query.after is not None else 0
        end = ids.index(query.before) if query.before is not None else len(items)
        window = items[start:end]
        page = window[: query.limit]
        return {
            "object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(window) > len(page),
        }


def _skeleton(req: ResponsesRequest, gen: Generation) -> dict[str, Any]:
    """The response object before any output: the request's settings echoed back."""
    return {
        "id": convert.new_id("resp"), "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
        "model": gen.model, "output": [], "parallel_tool_calls": req.parallel_tool_calls is True,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning or {"effort": None, "summary": None},
        "store": req.store, "temperature": req.temperature, "text": convert.text_echo(req.text),
        "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "top_p": req.top_p,
        "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
        "metadata": req.metadata or {},
    }
