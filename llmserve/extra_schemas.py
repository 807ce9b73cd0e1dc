"""Wire types of the routes beyond chat/completions: tokenize, detokenize, embeddings, /chat."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

_LENIENT = ConfigDict(extra="ignore", allow_inf_nan=False)


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
