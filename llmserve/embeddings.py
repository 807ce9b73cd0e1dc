"""Embeddings on whichever backend serves the model (no HTTP here; the in-process job, on the
engine thread, is InProcessBackend.embed)."""

from __future__ import annotations

import threading

from llmserve.backends.pool import BackendPool
from llmserve.schemas import EmbeddingRequest
from llmserve.vectors import Embeddings


class EmbeddingService:
    """/v1/embeddings."""

    def __init__(self, backends: BackendPool):
        self.backends = backends

    async def embed(
        self, req: EmbeddingRequest, cancelled: threading.Event | None = None
    ) -> Embeddings:
        """Normalised embeddings for every input of the request; stops between inputs once
        `cancelled` is set (the client went away)."""
        return await self.backends.route(req.model).embed(req, cancelled)
