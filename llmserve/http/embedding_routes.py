"""OpenAI's /v1/embeddings."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from llmserve.http.deps import EmbeddingsDep
from llmserve.http.openapi import API, errors
from llmserve.schemas import EmbeddingRequest

router = APIRouter(responses=errors(*API))


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
async def embeddings(
    body: EmbeddingRequest, request: Request, service: EmbeddingsDep
) -> dict[str, Any]:
    """OpenAI embeddings: unit-length vectors as floats or base64 float32."""
    async with _departure(request) as gone:
        result = await service.embed(body, gone)
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
