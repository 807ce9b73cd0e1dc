"""`POST /chat`: one prompt in, the reply streamed back as plain text (for curl)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from llmserve.http.deps import ServiceDep, json_body
from llmserve.http.openai_routes import stream_error
from llmserve.http.openapi import API, errors
from llmserve.schemas import ChatCompletionRequest, PlainChatRequest
from llmserve.service import TextDelta

router = APIRouter(responses=errors(*API))


@router.post("/chat")
async def plain_chat(
    body: Annotated[PlainChatRequest, Depends(json_body(PlainChatRequest))], service: ServiceDep
) -> StreamingResponse:
    """`{"prompt", "max_tokens"?}` -> the reply as plain text, streamed as it is generated."""
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
