"""Anthropic routes: POST /v1/messages (JSON or SSE) and /v1/messages/count_tokens.

Every error on these routes, validation errors included, takes Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`): AnthropicRoute catches them before the
app's OpenAI-shaped handlers do. The `anthropic-version` header is accepted and not checked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.anthropic.convert import stop_reason
from llmserve.anthropic.events import MessageBuilder, error_body, message_id, sse, usage
from llmserve.anthropic.schemas import CountTokensRequest, MessagesRequest
from llmserve.anthropic.service import PromptFacts, cache_usage, parts
from llmserve.errors import ContextLengthError, LlmserveError, QueueFullError
from llmserve.http.deps import MessagesDep, whole_body_message
from llmserve.http.openai_routes import collect_unless_gone
from llmserve.http.openapi import API, AnthropicErrorBody, errors
from llmserve.service import Finished, Generation

logger = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON"
    whole = whole_body_message(first)
    if whole is not None:
        return whole
    # NOTE: pydantic puts union members in loc (tagged-union tags, "list[...]"): drop them.
    loc = [str(p) for p in first.get("loc", ())
           if p != "body" and not any(c in str(p) for c in "[]()',")]
    where = ".".join(loc) or "body"
    if first.get("type") == "missing":
        return f"{where}: Field required"
    return f"{where}: {first.get('msg', 'invalid value')}"


def warning_headers(warnings: tuple[str, ...]) -> dict[str, str]:
    """RFC 7234 `Warning: 299 llmserve "..."` values, joined: what was left out of the prompt."""
    if not warnings:
        return {}
    return {"Warning": ", ".join(f'299 llmserve "{w}"' for w in warnings)}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def _message(exc: LlmserveError) -> str:
    """The error's message in Anthropic's words where they differ from OpenAI's."""
    return exc.anthropic_message if isinstance(exc, ContextLengthError) else exc.message


class AnthropicRoute(APIRoute):
    """An APIRoute whose errors are answered in Anthropic's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _error(400, _validation_message(exc))
            except LlmserveError as exc:
                retry = {"Retry-After": str(exc.retry_after)} if isinstance(
                    exc, QueueFullError) else None
                return _error(exc.status, _message(exc), retry)
            except StarletteHTTPException as exc:
                return _error(exc.status_code, str(exc.detail))
            except Exception as exc:
                logger.exception("unhandled error")
                return _error(500, f"internal error: {exc}")

        return route


router = APIRouter(prefix="/v1", route_class=AnthropicRoute,
                   responses=errors(*API, body=AnthropicErrorBody))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(event="ping", data=json.dumps({"type": "ping"}))


def _final_usage(gen: Generation, facts: PromptFacts, output_tokens: int) -> dict[str, int]:
    prompt, read, created = cache_usage(gen, facts)
    return usage(prompt, output_tokens, read, created)


def _stream(gen: Generation, facts: PromptFacts, max_tokens: int) -> EventSourceResponse:
    builder = MessageBuilder(message_id(), gen.model)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            for event in builder.start(_final_usage(gen, facts, 0)):
                yield sse(event)
            finished: Finished | None = None
            async for part in parts(gen):
                if isinstance(part, Finished):
                    finished = part
                    continue
                for event in builder.feed(part):
                    yield sse(event)
            if finished is None:
                raise RuntimeError("the generation ended without finishing")
            reason, sequence = stop_reason(finished, max_tokens)
            end = _final_usage(gen, facts, finished.completion_tokens)
            for event in builder.finish(reason, sequence, end):
                yield sse(event)
        except Exception as exc:
            # NOTE: the status line is gone; an `error` event is how Anthropic ends a stream.
            logger.exception("message stream failed")
            status = exc.status if isinstance(exc, LlmserveError) else 500
            message = _message(exc) if isinstance(exc, LlmserveError) else f"internal error: {exc}"
            yield {"event": "error", "data": json.dumps(error_body(status, message))}
        finally:
            gen.cancel()  # runs on client disconnect too

    return EventSourceResponse(events(), ping=15, ping_message_factory=_ping,
                               headers=warning_headers(facts.warnings))


@router.post("/messages", response_model=None)
async def create_message(
    body: MessagesRequest, request: Request, response: Response, service: MessagesDep
) -> dict[str, Any] | EventSourceResponse:
    """Anthropic Messages: a Message, or its stream of events when `stream` is true."""
    gen, facts = await service.create(body)
    if body.stream:
        return _stream(gen, facts, body.max_tokens)
    response.headers.update(warning_headers(facts.warnings))

    async def collect() -> dict[str, Any]:
        builder = MessageBuilder(message_id(), gen.model)
        finished = Finished("stop", 0)
        async for part in parts(gen):
            if isinstance(part, Finished):
                finished = part
            else:
                builder.feed(part)
        reason, sequence = stop_reason(finished, body.max_tokens)
        return builder.message(reason, sequence,
                               _final_usage(gen, facts, finished.completion_tokens))

    return await collect_unless_gone(gen, request, collect)


@router.post("/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest, response: Response, service: MessagesDep
) -> dict[str, int]:
    """The prompt's token count, as /v1/messages would render it."""
    tokens, warnings = await service.count_tokens(body)
    response.headers.update(warning_headers(warnings))
    return {"input_tokens": tokens}
