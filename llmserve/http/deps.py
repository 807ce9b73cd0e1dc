"""FastAPI dependencies: the components create_app hangs on app.state, and JSON bodies read
whatever the Content-Type says."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from llmserve.anthropic.service import MessagesService
from llmserve.backends.pool import BackendPool
from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import ModelManager
from llmserve.config import Settings
from llmserve.embeddings import EmbeddingService
from llmserve.errors import InvalidRequestError
from llmserve.http.auth import KEY_ID_STATE
from llmserve.metrics import Metrics
from llmserve.responses.service import ResponsesService
from llmserve.scheduler import Scheduler
from llmserve.service import ChatService
from llmserve.tokens import TokenService

M = TypeVar("M", bound=BaseModel)


def _state(name: str) -> Callable[[Request], Any]:
    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
WorkerDep = Annotated[Scheduler, Depends(_state("worker"))]
ManagerDep = Annotated[ModelManager, Depends(_state("manager"))]
BackendsDep = Annotated[BackendPool, Depends(_state("backends"))]
CacheDep = Annotated[PrefixCache, Depends(_state("cache"))]
ServiceDep = Annotated[ChatService, Depends(_state("service"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
TokensDep = Annotated[TokenService, Depends(_state("tokens"))]
EmbeddingsDep = Annotated[EmbeddingService, Depends(_state("embeddings"))]
ResponsesDep = Annotated[ResponsesService, Depends(_state("responses"))]
MessagesDep = Annotated[MessagesService, Depends(_state("messages"))]


def get_owner(request: Request) -> str | None:
    """The id of the API key the request came with (auth.key_id); None when no keys are set."""
    owner: str | None = getattr(request.state, KEY_ID_STATE, None)
    return owner


OwnerDep = Annotated[str | None, Depends(get_owner)]


BODY_NOT_OBJECT = "the request body must be a JSON object"
BODY_EMPTY = "the request body is empty: it must be a JSON object"


def whole_body_message(error: Mapping[str, Any]) -> str | None:
    """What is wrong when a validation error is about the body as a whole (empty, or JSON
    that is not an object), else None: the error then names a field."""
    if [p for p in error.get("loc", ()) if p != "body"]:
        return None
    if error.get("type") == "missing":
        return BODY_EMPTY
    # NOTE: only the body's type; a model validator's own error (also at loc "body") stays
    if error.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return BODY_NOT_OBJECT
    return None


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency reading the body as JSON into `model`, whatever the Content-Type.

    NOTE: `curl -d '{...}'` sends application/x-www-form-urlencoded; llama-server reads its
    /tokenize, /detokenize and /chat bodies as JSON all the same, and so do we."""

    async def read(request: Request) -> M:
        raw = await request.body()
        if not raw.strip():
            raise InvalidRequestError(BODY_EMPTY)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError("request body is not valid JSON") from exc
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    return read
