"""Error responses in the OpenAPI document: declared once per router, in the one error shape.

Each router passes `responses=errors(...)` with the statuses its routes can answer; `tidy`
then drops from the document what cannot happen: 422 (validation errors are 400s here), 413
on GET and DELETE (no body), 401 on the public paths (auth.is_public).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from llmserve.http.auth import is_public


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}` (errors.error_body)."""

    error: ErrorObject


class AnthropicErrorObject(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """`{"type": "error", "error": {"type", "message"}}` (anthropic.events.error_body)."""

    type: str = "error"
    error: AnthropicErrorObject


WHY = {
    400: "Invalid request: a bad or missing parameter, a body that is not a JSON object, a "
         "prompt longer than the context",
    401: "Missing or invalid API key (when keys are set)",
    404: "Unknown model, or an unknown (or another key's) stored object",
    413: "Request body larger than --max_body_bytes",
    503: "Model not ready, queue full (Retry-After), or a backend unavailable",
}
API = (400, 401, 404, 413, 503)  # what a route that takes a body and runs a model can answer


def errors(*codes: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or route: each status with its description and error body."""
    return {code: {"model": body, "description": WHY[code]} for code in codes}


def tidy(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """An `app.openapi` that drops the statuses a route cannot answer (see the docstring)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = plain()
        for path, ops in doc.get("paths", {}).items():
            for method, op in ops.items():
                answers = op.get("responses", {})
                answers.pop("422", None)
                if method in ("get", "delete", "head"):
                    answers.pop("413", None)
                if is_public(path):
                    answers.pop("401", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    return openapi
