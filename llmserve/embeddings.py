"""Embeddings: normalised vectors from the model's embedding context, on the engine thread
(no HTTP here)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from llmserve.backends import extras as backends
from llmserve.catalog.registry import ModelManager
from llmserve.engine.base import Engine
from llmserve.errors import ContextLengthError, InvalidRequestError, RequestCancelledError
from llmserve.limits import check_text_fits, check_token_ids
from llmserve.metrics import Metrics
from llmserve.scheduler import Scheduler
from llmserve.schemas import EmbeddingRequest
from llmserve.vectors import Embeddings, unit_float32

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingService:
    """/v1/embeddings: every model call runs on the engine thread."""

    def __init__(self, manager: ModelManager, worker: Scheduler, metrics: Metrics):
        self.manager = manager
        self.worker = worker
        self.metrics = metrics

    async def embed(
        self, req: EmbeddingRequest, cancelled: threading.Event | None = None
    ) -> Embeddings:
        """Normalised embeddings for every input of the request; stops between inputs once
        `cancelled` is set (the client went away)."""
        if (proxied := await backends.embed(self.manager, req)) is not None:
            return proxied
        filename = self.manager.resolve(req.model) if req.model else None
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
            self.metrics.embedded(engine.info.name, total)
            return Embeddings(engine.info.name, [unit_float32(v) for v in vectors], total)

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
            raise ContextLengthError(len(tokens), n_ctx, param=param, what=f"input {i}")
        out.append(tokens)
    return out
