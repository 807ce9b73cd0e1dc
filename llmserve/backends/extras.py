"""/tokenize, /detokenize and /v1/embeddings for models on other backends (ExtraService asks
here first; None means the in-process engine serves the model)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from llmserve.errors import BackendError
from llmserve.vectors import Embeddings

if TYPE_CHECKING:
    from llmserve.catalog.registry import ModelManager
    from llmserve.schemas import EmbeddingRequest


async def tokenize(manager: ModelManager, model: str | None, body: dict[str, Any]
                   ) -> list[Any] | None:
    """The backend's tokens (ids, or `{"id", "piece"}` items) or None."""
    backend = manager.backends.route(model) if manager.backends is not None else None
    if backend is None:
        return None
    data = await backend.tokenize(body)
    tokens = data.get("tokens")
    if not isinstance(tokens, list):
        raise BackendError(f"backend {backend.name}: /tokenize answered without tokens")
    return tokens


async def detokenize(manager: ModelManager, model: str | None, tokens: list[int]
                     ) -> str | None:
    """The backend's text for tokens, or None."""
    backend = manager.backends.route(model) if manager.backends is not None else None
    if backend is None:
        return None
    data = await backend.detokenize({"tokens": tokens})
    return str(data.get("content", ""))


async def embed(manager: ModelManager, req: EmbeddingRequest) -> Embeddings | None:
    """The backend's embeddings (float32, as it sent them), or None."""
    backend = manager.backends.route(req.model) if manager.backends is not None else None
    if backend is None:
        return None
    body = req.model_dump(mode="json", exclude_none=True)
    body["encoding_format"] = "float"
    data = await backend.embed(body)
    try:
        rows = sorted(data["data"], key=lambda d: int(d.get("index", 0)))
        vectors = [struct.pack(f"<{len(r['embedding'])}f", *r["embedding"]) for r in rows]
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise BackendError(f"backend {backend.name}: malformed embeddings answer") from exc
    usage = data.get("usage") or {}
    return Embeddings(backend.name, vectors, int(usage.get("prompt_tokens") or 0))
