"""Wire types: OpenAI requests (chat, completions, embeddings), the admin routes' bodies and
llama-server's /tokenize, /detokenize and plain /chat."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from llmserve.tenancy import MAX_SALT_CHARS
from llmserve.units import parse_duration

# NOTE: clients (LangChain, the openai SDK, agent frameworks) send fields we do not use;
# ignoring them is what OpenAI-compatible servers are expected to do.
# NOTE: allow_inf_nan=False: `"inf"`, `"nan"` (strings pydantic would coerce) are no floats
# here; JSON's Infinity/NaN/1e309 literals never get this far (http/guard.py).
_LENIENT = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI Predicted Outputs: text the output is expected to repeat (a draft source for
    speculative decoding; the output is the same with or without it)."""

    model_config = _LENIENT
    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)


class ToolCallFunction(BaseModel):
    model_config = _LENIENT
    name: str
    arguments: str = ""


# A custom (freeform) tool is offered to the model as a function whose one string argument
# holds the freeform input (chat/custom_tools.py); its calls render back the same way.
FREEFORM_ARGUMENT = "input"


def freeform_arguments(text: str) -> str:
    """A custom tool call's input as the arguments of the function the model saw."""
    return json.dumps({FREEFORM_ARGUMENT: text}, ensure_ascii=False)


class ToolCall(BaseModel):
    """An assistant message's tool call; a custom one (`{"type": "custom", "custom": {"name",
    "input"}}`) is read as the function call the model made for it."""

    model_config = _LENIENT
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction

    @model_validator(mode="before")
    @classmethod
    def _custom_as_function(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") == "custom" and isinstance(v.get("custom"), dict):
            custom = v["custom"]
            text = custom.get("input")
            return {"id": v.get("id", ""), "type": "function", "function": {
                "name": custom.get("name"),
                "arguments": freeform_arguments(text) if isinstance(text, str) else text,
            }}
        return v


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thinking, for templates

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


class CustomToolSpec(BaseModel):
    """A custom tool: freeform text input, optionally described by a grammar `format`
    (`{"type": "grammar", "syntax": "lark" | "regex", "definition"}` or `{"type": "text"}`)."""

    model_config = _LENIENT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    format: dict[str, Any] | None = None


class CustomToolDefinition(BaseModel):
    """Chat completions' `{"type": "custom", "custom": {...}}`."""

    model_config = _LENIENT
    type: Literal["custom"]
    custom: CustomToolSpec


def _tool_kind(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    # NOTE: capitalised tags: http/app.py leaves them out of an error's param, and any type
    # but "custom" gets ToolDefinition's error ("Input should be 'function'") as before.
    return "CustomToolDefinition" if kind == "custom" else "ToolDefinition"


AnyTool = Annotated[
    Annotated[ToolDefinition, Tag("ToolDefinition")]
    | Annotated[CustomToolDefinition, Tag("CustomToolDefinition")],
    Discriminator(_tool_kind),
]


class FunctionName(BaseModel):
    model_config = _LENIENT
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name"}}`; a custom tool's `{"type": "custom",
    "custom": {"name"}}` names the function it is offered as."""

    model_config = _LENIENT
    type: Literal["function"] = "function"
    function: FunctionName

    @model_validator(mode="before")
    @classmethod
    def _custom(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") == "custom" and "function" not in v:
            return {"type": "function", "function": v.get("custom")}
        return v


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)
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


class ThinkingOption(BaseModel):
    """`thinking: {"type": "enabled"}` (Anthropic's shape); a plain bool works too."""

    model_config = _LENIENT
    type: Literal["enabled", "disabled"]


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
    # NOTE: llama.cpp divides positive logits by it: 0 would make them infinite.
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
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
    keep_alive: float | None = Field(default=None, allow_inf_nan=True)
    # OpenAI: token id (a string key) -> bias added to its logit, -100 (ban) .. 100.
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None
    # vLLM compatible: the prompt cache reuses only KV of requests with the same salt (and
    # key): llmserve/tenancy.py.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)
    # vLLM compatible: lower is served first (admission, resumption after a preemption); the
    # highest is preempted first when the KV cache is full.
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    # speculative decoding: the most tokens drafted per step (default: the model's
    # --draft_max; 0 turns drafting off for this request), and the shortest draft verified
    draft_max: int | None = Field(default=None, ge=0, le=64)
    draft_min: int | None = Field(default=None, ge=0, le=64)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"[0-9]{1,10}", key):
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise ValueError(f"bias of token {key} must be within -100..100, got {bias}")
        return v

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

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

    def logprobs_count(self) -> int | None:
        """How many top logprobs each token reports; None: no logprobs asked for."""
        return None

    def stop_list(self) -> list[str]:
        """Stop sequences as a list without empty strings."""
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # NOTE: a Sequence, so a list of plain ToolDefinitions type-checks as tools too
    tools: Sequence[AnyTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # NOTE: unset means one call, then stop (llama-server's default): small models asked for
    # "required" calls otherwise repeat the same call until max_tokens.
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    prediction: Prediction | None = None  # OpenAI Predicted Outputs

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
    # Reasoning models: how the reply's thinking is returned (llama-server's reasoning_format;
    # default --reasoning_format), and what the chat template is told (variables it may read).
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    thinking: bool | ThinkingOption | None = None  # enable_thinking / thinking for templates
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables

    def thinking_enabled(self) -> bool | None:
        """`thinking` as a bool (None: not given)."""
        if isinstance(self.thinking, ThinkingOption):
            return self.thinking.type == "enabled"
        return self.thinking


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # top logprobs per token (legacy)

    def logprobs_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt string is supported")
        return v

    def prompt_text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class SetModelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)
    model_name: str = Field(alias="modelName", min_length=1)


class RestoreCacheRequest(BaseModel):
    """POST /restore_cache: pre-warm the prompt cache with a conversation."""

    model_config = _LENIENT
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[AnyTool] | None = None
    dry_run: bool = False
    # the prompt-cache partition to warm (with the caller's key): llmserve/tenancy.py
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)


def _encodable(text: str) -> str:
    # NOTE: JSON may carry lone surrogates ("\ud800") that are no valid UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid Unicode (lone surrogate)") from exc
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = Annotated[int, Strict()]


def _one_input_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # NOTE: a failed union reports one error per member with internal locations; one plain
    # message with `param: "input"` is what a client can act on.
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(
            "input must be a string, a list of strings, an array of token ids or a list of "
            "token id arrays"
        ) from None


EmbeddingInput = Annotated[
    Text | list[Text] | list[TokenId] | list[list[TokenId]], WrapValidator(_one_input_error)
]


class TokenizeRequest(BaseModel):
    """llama-server's /tokenize body."""

    model_config = _LENIENT
    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False  # tokens as {"id", "piece"} (a string, or bytes when not UTF-8)
    model: str | None = None


class DetokenizeRequest(BaseModel):
    """llama-server's /detokenize body."""

    model_config = _LENIENT
    tokens: list[TokenId]
    model: str | None = None


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings body: one or many texts or token arrays."""

    model_config = _LENIENT
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class PlainChatRequest(BaseModel):
    """`POST /chat`: one user prompt, answered as plain streamed text."""

    model_config = _LENIENT
    prompt: Text = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
