"""llama-server's /tokenize and /detokenize (JSON bodies whatever the Content-Type)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from llmserve.http.deps import TokensDep, json_body
from llmserve.http.openapi import API, errors
from llmserve.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(responses=errors(*API))


@router.post("/tokenize")
async def tokenize(
    body: Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest))], tokens: TokensDep
) -> dict[str, Any]:
    """`{"content", "add_special"?, "parse_special"?, "with_pieces"?}` -> `{"tokens": [...]}`."""
    ids = await tokens.tokenize(
        body.content, add_special=body.add_special, parse_special=body.parse_special,
        model=body.model, with_pieces=body.with_pieces,
    )
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(
    body: Annotated[DetokenizeRequest, Depends(json_body(DetokenizeRequest))], tokens: TokensDep
) -> dict[str, Any]:
    """`{"tokens": [...]}` -> `{"content": "..."}`."""
    return {"content": await tokens.detokenize(body.tokens, model=body.model)}
