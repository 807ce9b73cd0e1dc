"""OpenAI routes: chat/completions and completions (JSON or SSE), and /v1/models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from llmserve.http.deps import ManagerDep, ServiceDep
from llmserve.schemas import ChatCompletionRequest, CompletionRequest
from llmserve.service import Finished, Generation, Message, TextDelta, ToolCallDelta

router = APIRouter()
v1_router = APIRouter(prefix="/v1")
T = TypeVar("T")


def _usage(gen: Generation, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": gen.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


def _chat_choice(reply: Message, index: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["content"] = reply.content or None
        message["tool_calls"] = reply.tool_calls
    return {"index": index, "message": message, "logprobs": None,
            "finish_reason": reply.finished.finish_reason}


def _tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed tool call: id, type and name only in a call's first delta."""
    call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        call.update(id=delta.id, type="function")
        call["function"]["name"] = delta.name
    return {"tool_calls": [call]}


def _text_choice(text: str, reason: str | None, index: int = 0) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


async def _collect_unless_gone(
    gen: Generation, request: Request, collect: Callable[[], Awaitable[T]]
) -> T:
    """Collect the whole output, cancelling generation if the client goes away."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gen.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await collect()
    finally:
        watcher.cancel()


def _sse(
    gen: Generation,
    chunk: Callable[[dict[str, Any] | None, str | None, int], dict[str, Any]],
    first_delta: dict[str, Any] | None,
    include_usage: bool,
) -> EventSourceResponse:
    """Stream OpenAI chunks as SSE `data:` events, ending with `[DONE]`."""

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            if first_delta is not None:
                for i in range(gen.n):
                    yield {"data": json.dumps(chunk(first_delta, None, i))}
            completion_tokens = 0
            async for event in gen:
                if isinstance(event, TextDelta):
                    yield {"data": json.dumps(chunk({"content": event.text}, None, event.choice))}
                elif isinstance(event, ToolCallDelta):
                    yield {"data": json.dumps(chunk(_tool_call_delta(event), None, event.choice))}
                elif isinstance(event, Finished):
                    completion_tokens += event.completion_tokens
                    yield {"data": json.dumps(chunk({}, event.finish_reason, event.choice))}
            if include_usage:
                final = chunk(None, None, 0)
                final["choices"] = []
                final["usage"] = _usage(gen, completion_tokens)
                yield {"data": json.dumps(final)}
            yield {"data": "[DONE]"}
        finally:
            # NOTE: runs when the client disconnects too: stop the generation promptly.
            gen.cancel()

    return EventSourceResponse(events(), ping=15)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> dict[str, Any] | EventSourceResponse:
    """OpenAI chat completion, streamed as SSE when `stream` is true."""
    gen = await service.chat(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any] | None, reason: str | None, i: int) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": gen.id, "object": "chat.completion.chunk", "created": gen.created,
                "model": gen.model, "system_fingerprint": None,
                "choices": [
                    {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
                ],
            }
            if include_usage:
                out["usage"] = None
            return out

        first = {"role": "assistant", "content": ""}
        return _sse(gen, chunk, first, include_usage)
    replies = await _collect_unless_gone(gen, request, gen.collect_messages)
    return {
        "id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
        "system_fingerprint": None,
        "choices": [_chat_choice(reply, i) for i, reply in enumerate(replies)],
        "usage": _usage(gen, sum(r.finished.completion_tokens for r in replies)),
    }


@router.post("/apply-template")
async def apply_template(body: ChatCompletionRequest, service: ServiceDep) -> dict[str, Any]:
    """The prompt a chat request renders to (and its token count), without generating."""
    return await service.apply_template(body)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep
) -> dict[str, Any] | EventSourceResponse:
    """OpenAI text completion, streamed as SSE when `stream` is true."""
    gen = await service.complete(body)
    prefix = body.prompt_text() if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any] | None, reason: str | None, i: int) -> dict[str, Any]:
            text = (delta or {}).get("content", "")
            out: dict[str, Any] = {
                "id": gen.id, "object": "text_completion", "created": gen.created,
                "model": gen.model, "choices": [_text_choice(text, reason, i)],
            }
            if include_usage:
                out["usage"] = None
            return out

        first = {"content": prefix} if prefix else None
        return _sse(gen, chunk, first, include_usage)
    texts, finishes = await _collect_unless_gone(gen, request, gen.collect_texts)
    return {
        "id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
        "choices": [_text_choice(prefix + t, f.finish_reason, i)
                    for i, (t, f) in enumerate(zip(texts, finishes, strict=True))],
        "usage": _usage(gen, sum(f.completion_tokens for f in finishes)),
    }


@v1_router.get("/models")
async def list_models(manager: ManagerDep) -> dict[str, Any]:
    """OpenAI model list: the active model first, then the rest of the models dir."""
    active = manager.active_name
    names = [m.name for m in manager.files()]
    ordered = ([active] if active in names else []) + [n for n in names if n != active]
    # NOTE: models.yaml `aliases` (e.g. gpt-4o-mini) are names clients may pick from here.
    aliases = [a for a, _ in manager.library.served_aliases() if a not in names]
    created = 0
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "llmserve"}
            for n in ordered + aliases
        ],
    }
