"""OpenAI Responses routes: create (JSON or semantic SSE), retrieve, delete, input_items."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sse_starlette.sse import EventSourceResponse

from llmserve.http.deps import OwnerDep, ResponsesDep
from llmserve.http.openai_routes import collect_unless_gone, sse_response, stream_error
from llmserve.http.openapi import API, errors
from llmserve.responses.schemas import InputItemsQuery, ResponsesRequest
from llmserve.responses.service import ResponseRun

router = APIRouter(prefix="/v1", responses=errors(401, 404))


def _sse(run: ResponseRun) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        # NOTE: run.events() ends a failed run with `error` and `response.failed` itself
        async for event in run.events():
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}

    def failed(exc: Exception) -> list[dict[str, str]]:
        body = {"type": "error", **stream_error(run.gen.id, exc)["error"]}
        return [{"event": "error", "data": json.dumps(body)}]

    return sse_response(run.gen, events(), failed)


@router.post("/responses", response_model=None, responses=errors(*API))
async def create_response(
    body: ResponsesRequest, request: Request, service: ResponsesDep, owner: OwnerDep
) -> dict[str, Any] | EventSourceResponse:
    """OpenAI Responses: create a response, streamed as semantic SSE events when `stream`."""
    run = await service.create(body, owner)
    if body.stream:
        return _sse(run)
    return await collect_unless_gone(run.gen, request, run.collect)


@router.get("/responses/{response_id}")
async def get_response(
    response_id: str, service: ResponsesDep, owner: OwnerDep
) -> dict[str, Any]:
    """A stored response (the caller's key's own, when keys are set)."""
    return service.get(response_id, owner)


@router.delete("/responses/{response_id}")
async def delete_response(
    response_id: str, service: ResponsesDep, owner: OwnerDep
) -> dict[str, Any]:
    """Delete a stored response (the caller's key's own, when keys are set)."""
    return service.delete(response_id, owner)


@router.get("/responses/{response_id}/input_items", responses=errors(400))
async def list_input_items(
    response_id: str, service: ResponsesDep, owner: OwnerDep,
    query: Annotated[InputItemsQuery, Query()],
) -> dict[str, Any]:
    """The input items a stored response was generated from, paginated."""
    return service.input_items(response_id, query, owner)
