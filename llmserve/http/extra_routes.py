"""Routes beyond chat/completions: /tokenize, /detokenize, /v1/embeddings and plain /chat.

NOTE: /tokenize, /detokenize and /chat read JSON whatever the Content-Type says, because
`curl -d '{...}'` sends application/x-www-form-urlencoded (llama-server reads them the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from llmserve.errors import InvalidRequestError
from llmserve.extra_schemas import (
    DetokenizeRequest,
    EmbeddingRequest,
    PlainChatRequest,
    TokenizeRequest,
)
from llmserve.extra_service import ExtraService
from llmserve.http.deps import ServiceDep
from llmserve.http.openai_routes import stream_error
from llmserve.schemas import ChatCompletionRequest
from llmserve.service import TextDelta

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def _extra(request: Request) -> ExtraService:
    extra: ExtraService = request.app.state.extra_service
    return extra


ExtraDep = Annotated[ExtraService, Depends(_extra)]


async def _json_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError("request body is not valid JSON") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


@router.post("/tokenize")
async def tokenize(request: Request, extra: ExtraDep) -> dict[str, Any]:
    """`{"content", "add_special"?, "parse_special"?, "with_pieces"?}` -> `{"tokens": [...]}`."""
    body = await _json_body(request, TokenizeRequest)
    tokens = await extra.tokenize(
        body.content, add_special=body.add_special, parse_special=body.parse_special,
        model=body.model, with_pieces=body.with_pieces,
    )
    return {"tokens": tokens}


@router.post("/detokenize")
async def detokenize(request: Request, extra: ExtraDep) -> dict[str, Any]:
    """`{"tokens": [...]}` -> `{"content": "..."}`."""
    body = await _json_body(request, DetokenizeRequest)
    return {"content": await extra.detokenize(body.tokens, model=body.model)}


@contextlib.asynccontextmanager
async def _departure(request: Request) -> AsyncIterator[threading.Event]:
    """An event set when the client disconnects (or the handler is cancelled)."""
    gone = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        gone.set()  # NOTE: also on CancelledError: the engine-thread job stops at its next check
        watcher.cancel()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, extra: ExtraDep) -> dict[str, Any]:
    """OpenAI embeddings: unit-length vectors as floats or base64 float32."""
    async with _departure(request) as gone:
        result = await extra.embed(body, gone)
    encode = result.base64 if body.encoding_format == "base64" else result.floats
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(i)}
            for i in range(len(result.vectors))
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


@router.post("/chat")
async def plain_chat(request: Request, service: ServiceDep) -> StreamingResponse:
    """`{"prompt", "max_tokens"?}` -> the reply as plain text, streamed as it is generated."""
    body = await _json_body(request, PlainChatRequest)
    fields: dict[str, Any] = {
        "messages": [{"role": "user", "content": body.prompt}],
        "max_tokens": body.max_tokens,
        "model": body.model,
    }
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    gen = await service.chat(ChatCompletionRequest.model_validate(fields))

    async def text() -> AsyncIterator[str]:
        try:
            async for event in gen:
                if isinstance(event, TextDelta):
                    yield event.text
            yield "\n"
        except Exception as exc:  # NOTE: the 200 is sent: say so in the text itself
            yield f"\n[error: {stream_error(gen.id, exc)['error']['message']}]\n"
        finally:
            gen.cancel()  # NOTE: also runs when the client goes away

    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")
