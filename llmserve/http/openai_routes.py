"""OpenAI routes: chat/completions and completions (JSON or SSE), and /v1/models."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from llmserve.catalog.listing import openai_models
from llmserve.errors import InternalError, LlmserveError, error_body
from llmserve.http.chat_tool_calls import ChatToolCalls, custom_tool_names, function_call_delta
from llmserve.http.deps import ManagerDep, ServiceDep
from llmserve.http.logprobs import chat_logprobs, completion_logprobs
from llmserve.http.openapi import API, errors
from llmserve.schemas import ChatCompletionRequest, CompletionRequest
from llmserve.service import (
    Finished,
    Generation,
    Message,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)

logger = logging.getLogger(__name__)
router = APIRouter(responses=errors(*API))
v1_router = APIRouter(prefix="/v1", responses=errors(401))
T = TypeVar("T")
# (delta, finish_reason, choice index, the delta's token logprobs) -> one streamed chunk
Chunk = Callable[..., dict[str, Any]]


def _usage(gen: Generation, ends: list[Finished]) -> dict[str, Any]:
    completion_tokens = sum(f.completion_tokens for f in ends)
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": gen.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": sum(f.reasoning_tokens for f in ends),
            "accepted_prediction_tokens": sum(f.accepted_prediction_tokens for f in ends),
            "rejected_prediction_tokens": sum(f.rejected_prediction_tokens for f in ends),
        },
    }


def _chat_choice(reply: Message, index: int, logprobs: bool, calls: ChatToolCalls
                 ) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning  # llama-server's and DeepSeek's field
    if reply.tool_calls:
        message["content"] = reply.content or None
        message["tool_calls"] = calls.message(reply.tool_calls)
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(reply.logprobs or []) if logprobs else None,
            "finish_reason": reply.finished.finish_reason}


def _text_choice(text: str, reason: str | None, index: int = 0,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


async def collect_unless_gone(
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
    except LlmserveError:
        raise
    except Exception as exc:  # NOTE: a generation failure: a 500 in the error shape, logged
        raise InternalError(stream_error(gen.id, exc)["error"]["message"]) from exc
    finally:
        watcher.cancel()


def _sse(
    gen: Generation,
    chunk: Chunk,
    first_delta: dict[str, Any] | None,
    include_usage: bool,
    calls: ChatToolCalls | None = None,
) -> EventSourceResponse:
    """Stream OpenAI chunks as SSE `data:` events, ending with `[DONE]`."""

    async def body() -> AsyncIterator[dict[str, str]]:
        if first_delta is not None:
            for i in range(gen.n):
                yield {"data": json.dumps(chunk(first_delta, None, i))}
        ends: list[Finished] = []
        async for event in gen:
            if isinstance(event, TextDelta):
                yield {"data": json.dumps(
                    chunk({"content": event.text}, None, event.choice, event.logprobs))}
            elif isinstance(event, ReasoningDelta):
                delta = {"reasoning_content": event.text}
                yield {"data": json.dumps(chunk(delta, None, event.choice))}
            elif isinstance(event, ToolCallDelta):
                piece = calls.delta(event) if calls else function_call_delta(event)
                if piece is not None:
                    yield {"data": json.dumps(chunk(piece, None, event.choice))}
            elif isinstance(event, Finished):
                for rest in calls.flush(event.choice) if calls else []:
                    yield {"data": json.dumps(chunk(rest, None, event.choice))}
                ends.append(event)
                yield {"data": json.dumps(chunk({}, event.finish_reason, event.choice))}
        if include_usage:
            final = chunk(None, None, 0)
            final["choices"] = []
            final["usage"] = _usage(gen, ends)
            yield {"data": json.dumps(final)}
        yield {"data": "[DONE]"}

    def failed(exc: Exception) -> list[dict[str, str]]:
        return [{"data": json.dumps(stream_error(gen.id, exc))}, {"data": "[DONE]"}]

    return sse_response(gen, body(), failed)


def sse_response(
    gen: Generation, events: AsyncIterator[dict[str, str]],
    failed: Callable[[Exception], list[dict[str, str]]],
) -> EventSourceResponse:
    """An SSE response of events; a failure after the 200 went out ends the stream with
    failed(exc)'s events (never a silent cut); the generation stops when the stream ends,
    the client's disconnect included."""

    async def guarded() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # NOTE: the 200 is sent: end the stream with an error event
            for event in failed(exc):
                yield event
        finally:
            gen.cancel()

    return EventSourceResponse(guarded(), ping=15)


def stream_error(request_id: str, exc: Exception) -> dict[str, Any]:
    """The error body for a failure after a stream started (logged with the request id)."""
    if isinstance(exc, LlmserveError):
        logger.warning("%s failed mid-stream: %s", request_id, exc.message)
        return exc.body()
    logger.error("%s failed mid-stream", request_id, exc_info=exc)
    return error_body(f"internal error: {exc}", "server_error")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> dict[str, Any] | EventSourceResponse:
    """OpenAI chat completion, streamed as SSE when `stream` is true."""
    gen = await service.chat(body)
    logprobs = body.logprobs_count() is not None
    calls = ChatToolCalls(custom_tool_names(body))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any] | None, reason: str | None, i: int,
                  tokens: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
            lp = chat_logprobs(tokens) if logprobs and tokens else None
            out: dict[str, Any] = {
                "id": gen.id, "object": "chat.completion.chunk", "created": gen.created,
                "model": gen.model, "system_fingerprint": None,
                "choices": [
                    {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
                ],
            }
            if include_usage:
                out["usage"] = None
            return out

        first = {"role": "assistant", "content": ""}
        return _sse(gen, chunk, first, include_usage, calls)
    replies = await collect_unless_gone(gen, request, gen.collect_messages)
    return {
        "id": gen.id, "object": "chat.completion", "created": gen.created, "model": gen.model,
        "system_fingerprint": None,
        "choices": [_chat_choice(reply, i, logprobs, calls) for i, reply in enumerate(replies)],
        "usage": _usage(gen, [r.finished for r in replies]),
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
    logprobs = body.logprobs_count() is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [len(prefix)] * gen.n

        def chunk(delta: dict[str, Any] | None, reason: str | None, i: int,
                  tokens: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
            text = (delta or {}).get("content", "")
            lp = None
            if logprobs and tokens:
                lp = completion_logprobs(tokens, offsets[i])
                offsets[i] += sum(len(t) for t in lp["tokens"])
            out: dict[str, Any] = {
                "id": gen.id, "object": "text_completion", "created": gen.created,
                "model": gen.model, "choices": [_text_choice(text, reason, i, lp)],
            }
            if include_usage:
                out["usage"] = None
            return out

        first = {"content": prefix} if prefix else None
        return _sse(gen, chunk, first, include_usage)
    texts, finishes = await collect_unless_gone(gen, request, gen.collect_texts)
    return {
        "id": gen.id, "object": "text_completion", "created": gen.created, "model": gen.model,
        "choices": [
            _text_choice(prefix + t, f.finish_reason, i,
                         completion_logprobs(gen.logprobs[i], len(prefix)) if logprobs else None)
            for i, (t, f) in enumerate(zip(texts, finishes, strict=True))
        ],
        "usage": _usage(gen, list(finishes)),
    }


@v1_router.get("/models")
async def list_models(manager: ManagerDep) -> dict[str, Any]:
    """OpenAI model list (catalog/listing.py): the active model first, each with its
    context_length and meta.n_ctx_train."""
    return {"object": "list", "data": await asyncio.to_thread(openai_models, manager)}
