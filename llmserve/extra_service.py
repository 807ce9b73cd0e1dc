"""Tokenize, detokenize and embeddings: thin flows onto the engine thread (no HTTP here)."""

from __future__ import annotations

import base64
import math
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmserve.backends import extras as backends
from llmserve.catalog.registry import ModelManager
from llmserve.engine.base import Engine
from llmserve.errors import ContextLengthError, InvalidRequestError, RequestCancelledError
from llmserve.extra_schemas import EmbeddingRequest
from llmserve.limits import TOKENIZE_CONTEXTS, check_text_fits
from llmserve.metrics import Metrics
from llmserve.scheduler import Scheduler

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


@dataclass(frozen=True)
class Embeddings:
    """Unit-length float32 vectors, one per input, and the tokens they took."""

    model: str
    vectors: list[bytes]  # little-endian float32, what base64 encodes
    prompt_tokens: int

    def floats(self, index: int) -> list[float]:
        """Vector `index` as floats (exactly the float32 values base64 carries)."""
        raw = self.vectors[index]
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))

    def base64(self, index: int) -> str:
        """Vector `index` as OpenAI's base64 encoding_format."""
        return base64.b64encode(self.vectors[index]).decode("ascii")


def check_token_ids(tokens: list[int], n_vocab: int, param: str) -> None:
    """400 for ids outside the vocabulary (llama.cpp would read out of bounds)."""
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the model's vocabulary (0..{n_vocab - 1})",
            param=param,
        )


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


def _unit_float32(vector: list[float]) -> bytes:
    norm = math.sqrt(sum(x * x for x in vector))
    scaled = [x / norm for x in vector] if norm > 0 else vector
    return struct.pack(f"<{len(scaled)}f", *scaled)


class ExtraService:
    """The routes beyond chat: every model call runs on the engine thread."""

    def __init__(self, manager: ModelManager, worker: Scheduler, metrics: Metrics | None = None):
        self.manager = manager
        self.worker = worker
        self.metrics = metrics

    def _filename(self, model: str | None) -> str | None:
        return self.manager.resolve(model) if model else None

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
        filename = self._filename(model)

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
        filename = self._filename(model)

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

    async def embed(
        self, req: EmbeddingRequest, cancelled: threading.Event | None = None
    ) -> Embeddings:
        """Normalised embeddings for every input of the request; stops between inputs once
        `cancelled` is set (the client went away)."""
        if (proxied := await backends.embed(self.manager, req)) is not None:
            return proxied
        filename = self._filename(req.model)
        inputs = req.input
        if isinstance(inputs, list) and not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if isinstance(inputs, list) and len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input"
            )

        def check() -> None:
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("the client went away; embeddings stopped")

        def job() -> Embeddings:
            engine = self.manager.ensure(filename)
            batch = _token_lists(engine, req, check)
            vectors = []
            for tokens in batch:  # NOTE: one input at a time, so a departed client stops it
                check()
                vectors += engine.embed([tokens])
            total = sum(len(t) for t in batch)
            if self.metrics is not None:
                self.metrics.embedded(engine.info.name, total)
            return Embeddings(engine.info.name, [_unit_float32(v) for v in vectors], total)

        result = await self.worker.call(job)
        width = len(result.vectors[0]) // 4
        if req.dimensions is not None and req.dimensions != width:
            raise InvalidRequestError(
                f"this model's embeddings have {width} dimensions; "
                f"`dimensions` {req.dimensions} is not supported",
                param="dimensions",
            )
        return result


def _token_lists(
    engine: Engine, req: EmbeddingRequest, check: Callable[[], None]
) -> list[list[int]]:
    """On the engine thread: every input as a checked token list."""
    raw = req.input
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [[x for x in raw if isinstance(x, int)]]  # one token array
    else:
        items = [x for x in raw if isinstance(x, str | list)]
    n_ctx = engine.info.n_ctx
    out: list[list[int]] = []
    for i, item in enumerate(items):
        param = "input" if len(items) == 1 else f"input.{i}"
        check()
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError("input strings must not be empty", param=param)
            check_text_fits(item, engine.info, param)
            tokens = engine.tokenize(item, add_special=True, parse_special=False)
        else:
            check_token_ids(item, engine.info.n_vocab, param)
            tokens = item
        if not tokens:
            raise InvalidRequestError("input must hold at least one token", param=param)
        if len(tokens) > n_ctx:
            raise ContextLengthError(
                f"input {i} is {len(tokens)} tokens but the model's context is {n_ctx} tokens",
                param=param, n_prompt_tokens=len(tokens), n_ctx=n_ctx,
            )
        out.append(tokens)
    return out
