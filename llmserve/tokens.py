"""Tokenize and detokenize with a model's tokenizer, on the engine thread (no HTTP here)."""

from __future__ import annotations

from typing import Any

from llmserve.backends import extras as backends
from llmserve.catalog.registry import ModelManager
from llmserve.engine.base import Engine
from llmserve.errors import InvalidRequestError
from llmserve.limits import TOKENIZE_CONTEXTS, check_text_fits, check_token_ids
from llmserve.scheduler import Scheduler


def token_piece(engine: Engine, token: int) -> bytes:
    """A token's bytes, special tokens as their text (engines without the method: its text)."""
    piece = getattr(engine, "token_piece", None)
    if callable(piece):
        return bytes(piece(token))
    return engine.detokenize([token], special=True).encode("utf-8")


def piece_json(raw: bytes) -> str | list[int]:
    """A piece as llama-server writes it: a string if valid UTF-8, else its byte values."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


class TokenService:
    """/tokenize and /detokenize: every model call runs on the engine thread."""

    def __init__(self, manager: ModelManager, worker: Scheduler):
        self.manager = manager
        self.worker = worker

    async def tokenize(
        self, content: str, *, add_special: bool, parse_special: bool, model: str | None = None,
        with_pieces: bool = False,
    ) -> list[int] | list[dict[str, Any]]:
        """Text to token ids with the active (or named) model's tokenizer; with_pieces gives
        llama-server's `{"id", "piece"}` items instead."""
        asked = {"content": content, "add_special": add_special, "parse_special": parse_special,
                 "with_pieces": with_pieces}
        if (proxied := await backends.tokenize(self.manager, model, asked)) is not None:
            return proxied
        filename = self.manager.resolve(model) if model else None

        def job() -> list[int] | list[dict[str, Any]]:
            engine = self.manager.ensure(filename)
            check_text_fits(content, engine.info, "content", TOKENIZE_CONTEXTS)
            tokens = engine.tokenize(content, add_special=add_special, parse_special=parse_special)
            if not with_pieces:
                return tokens
            return [{"id": t, "piece": piece_json(token_piece(engine, t))} for t in tokens]

        return await self.worker.call(job)

    async def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        """Token ids to text; special tokens are rendered (llama-server does the same)."""
        if (text := await backends.detokenize(self.manager, model, tokens)) is not None:
            return text
        filename = self.manager.resolve(model) if model else None

        def job() -> str:
            engine = self.manager.ensure(filename)
            most = TOKENIZE_CONTEXTS * engine.info.n_ctx
            if len(tokens) > most:
                raise InvalidRequestError(
                    f"{len(tokens)} tokens; at most {most} ({TOKENIZE_CONTEXTS} contexts) per "
                    "request", param="tokens",
                )
            check_token_ids(tokens, engine.info.n_vocab, "tokens")
            return engine.detokenize(tokens, special=True)

        return await self.worker.call(job)
