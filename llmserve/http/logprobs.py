"""Token logprobs in OpenAI's two wire shapes: chat's `logprobs.content` and the legacy
text-completion `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmserve.output import TokenLogprob


def _text(piece: bytes) -> str:
    # NOTE: a token may be part of a UTF-8 character; `bytes` carries the exact value.
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """choices[].logprobs of a chat completion (or of one streamed chunk)."""
    return {
        "content": [
            {
                "token": _text(t.piece), "logprob": t.logprob, "bytes": list(t.piece),
                "top_logprobs": [
                    {"token": _text(p), "logprob": lp, "bytes": list(p)} for p, lp in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """choices[].logprobs of a text completion; offset: characters of text before these."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(_text(t.piece))
    return {
        "tokens": [_text(t.piece) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_text(p): lp for p, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
