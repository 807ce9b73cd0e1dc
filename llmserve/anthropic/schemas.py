"""Anthropic Messages wire types: the request of POST /v1/messages and /count_tokens.

Responses and stream events are plain dicts built in llmserve/anthropic/events.py, checked by
the tests against the anthropic SDK's types.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from llmserve.tenancy import MAX_SALT_CHARS

logger = logging.getLogger(__name__)

# NOTE: like the OpenAI types, unknown fields (service_tier, container, context_management,
# betas' new fields, ...) are ignored; the known ones are still validated.
_LENIENT = ConfigDict(extra="ignore")


class CacheControl(BaseModel):
    model_config = _LENIENT
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"

    @property
    def seconds(self) -> float:
        """How long the pin lasts."""
        return 3600.0 if self.ttl == "1h" else 300.0


class TextBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class ToolUseBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)
    cache_control: CacheControl | None = None


class ToolResultBlock(BaseModel):
    model_config = _LENIENT
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool = False
    cache_control: CacheControl | None = None

    def text(self) -> str:
        """The result as one string (text blocks joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(block.text for block in self.content)

    def breakpoint(self) -> CacheControl | None:
        """Its own cache_control, or the last one on a text block inside it."""
        blocks = self.content if isinstance(self.content, list) else []
        inner = [b.cache_control for b in blocks if b.cache_control is not None]
        return self.cache_control or (inner[-1] if inner else None)


class ThinkingBlock(BaseModel):
    """Earlier thinking sent back in the history: accepted and left out of the prompt."""

    model_config = _LENIENT
    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""
    signature: str = ""
    data: str = ""
    cache_control: CacheControl | None = None


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class MessageParam(BaseModel):
    model_config = _LENIENT
    # NOTE: "system" is not in Anthropic's API, but Claude Code sends system entries inside
    # messages to servers it does not know as Anthropic's (see chat/system_turns.py).
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(BaseModel):
    """A custom (client) tool: the model calls it, the client runs it. `defer_loading` and
    other fields are ignored: the tool is rendered like any other."""

    model_config = _LENIENT
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None


class ServerTool(BaseModel):
    """A tool Anthropic runs itself (web_search_20250305, bash_..., mcp_toolset, ...): nothing
    here can run it, so it is left out of the prompt (convert.py) instead of refused."""

    model_config = _LENIENT
    type: str
    name: str | None = None
    cache_control: CacheControl | None = None


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "custom" if kind in (None, "custom") else "server"


AnyTool = Annotated[
    Annotated[Tool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoiceAuto(BaseModel):
    model_config = _LENIENT
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(BaseModel):
    model_config = _LENIENT
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(BaseModel):
    model_config = _LENIENT
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(BaseModel):
    model_config = _LENIENT
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class Metadata(BaseModel):
    model_config = _LENIENT
    user_id: str | None = None


class ThinkingConfig(BaseModel):
    """`thinking`: accepted; whether the model thinks is up to the model (see README)."""

    model_config = _LENIENT
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class JsonOutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """`output_config`: `format` (structured outputs) is served; `effort` is accepted."""

    model_config = _LENIENT
    format: JsonOutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(BaseModel):
    """POST /v1/messages/count_tokens: the prompt part of a Messages request."""

    model_config = _LENIENT
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnyTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    # top-level cache_control: a breakpoint on the last block (Anthropic's automatic caching)
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict) and logger.isEnabledFor(logging.DEBUG):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                logger.debug("Messages request: ignoring unknown fields %s", ", ".join(unknown))
        return data


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    # llmserve extension, as on the OpenAI routes: how long the model stays loaded after.
    keep_alive: float | str | None = None
    # llmserve extension (vLLM's field): the prompt-cache partition, llmserve/tenancy.py
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)

    @field_validator("stop_sequences")
    @classmethod
    def _few_stops(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v
