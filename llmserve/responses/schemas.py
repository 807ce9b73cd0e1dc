"""Wire types of POST /v1/responses (the response objects are plain dicts, see events.py).

Input items and tools stay plain dicts here: convert.py checks them one by one so that an
unsupported item or tool type is a 400 that names the type (not a pydantic union error).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.schemas import SamplingFields

_LENIENT = ConfigDict(extra="ignore")


class FunctionTool(BaseModel):
    """Responses' flat function tool: `{"type": "function", "name", "parameters", ...}`."""

    model_config = _LENIENT
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = _LENIENT
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses. llmserve's sampling extensions (top_k, min_p, seed, stop,
    keep_alive, grammar, ...) are accepted as in chat completions."""

    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: one call (the chat default, see README)
    max_output_tokens: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    previous_response_id: str | None = None
    # NOTE: reasoning {effort, summary} is echoed; the reasoning parser decides what it does.
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # accepted and not acted on: what the Agents SDK and other clients send routinely
    include: list[str] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # refused with a 400 when set (see convert.unsupported_fields)
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 metadata keys")
        for key, value in v.items():
            if len(key) > 64:
                raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
            if len(value) > 512:
                raise ValueError(f"metadata value of {key!r} is longer than 512 characters")
        return v


class InputItemsQuery(BaseModel):
    """GET /v1/responses/{id}/input_items query parameters."""

    model_config = _LENIENT
    limit: int = Field(default=20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    before: str | None = None
