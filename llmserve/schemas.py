"""OpenAI wire types (requests and responses) and the admin routes' bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmserve.units import parse_duration

# NOTE: clients (LangChain, the openai SDK, agent frameworks) send fields we do not use;
# ignoring them is what OpenAI-compatible servers are expected to do.
_LENIENT = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = _LENIENT
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = _LENIENT
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = _LENIENT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = _LENIENT
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _LENIENT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _LENIENT
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _LENIENT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = _LENIENT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling fields shared by chat and text completions."""

    model_config = _LENIENT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0)
    n: int = Field(default=1, ge=1, le=256)  # up to --parallel (checked by the service)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # llama-server compatible: keep generating past end-of-generation tokens (benchmarks).
    ignore_eos: bool = False
    # llama-server compatible: a GBNF grammar the output must match.
    grammar: str | None = None
    # Ollama compatible: how long the model stays loaded after this request ("5m", 300, 0 =
    # unload right after, negative = forever); parsed to seconds (math.inf for forever).
    keep_alive: float | None = None

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> float | None:
        if v is None:
            return None
        if not isinstance(v, str | int | float):
            raise ValueError("must be seconds or a duration like '5m'")
        return parse_duration(v)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        """Stop sequences as a list without empty strings."""
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # NOTE: unset means one call, then stop (llama-server's default): small models asked for
    # "required" calls otherwise repeat the same call until max_tokens.
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt string is supported")
        return v

    def prompt_text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SetModelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model_name: str = Field(alias="modelName", min_length=1)


class RestoreCacheRequest(BaseModel):
    """POST /restore_cache: pre-warm the prompt cache with a conversation."""

    model_config = _LENIENT
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    dry_run: bool = False
