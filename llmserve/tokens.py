"""Tokenize and detokenize with a model's tokenizer, on whichever backend serves it (no HTTP
here; the in-process jobs are InProcessBackend.tokenize / detokenize)."""

from __future__ import annotations

from llmserve.backends.base import Tokens
from llmserve.backends.pool import BackendPool


class TokenService:
    """/tokenize and /detokenize."""

    def __init__(self, backends: BackendPool):
        self.backends = backends

    async def tokenize(
        self, content: str, *, add_special: bool, parse_special: bool, model: str | None = None,
        with_pieces: bool = False,
    ) -> Tokens:
        """Text to token ids with the active (or named) model's tokenizer; with_pieces gives
        llama-server's `{"id", "piece"}` items instead."""
        return await self.backends.route(model).tokenize(
            model, content, add_special=add_special, parse_special=parse_special,
            with_pieces=with_pieces)

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        """Token ids to text; special tokens are rendered (llama-server does the same)."""
        return await self.backends.route(model).detokenize(model, tokens)
