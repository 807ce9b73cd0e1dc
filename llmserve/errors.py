"""Typed errors, each carrying its HTTP status and OpenAI error type/code.

LlmserveError
 +-- InvalidRequestError        400 invalid_request_error
 |    +-- ContextLengthError    400 code=context_length_exceeded
 |    +-- InvalidModelNameError 400 code=invalid_model_name
 |    +-- InvalidModelError     400 code=invalid_model (not a loadable GGUF, or outside the
 |                                  models dir)
 +-- AuthenticationError        401 authentication_error
 +-- NotFoundError              404 not_found_error
 |    +-- ModelNotFoundError    404 code=model_not_found
 +-- ModelNotReadyError         503 service_unavailable
 +-- QueueFullError             503 service_unavailable code=queue_full (Retry-After)
 +-- RequestCancelledError      499 code=cancelled (the client left; nobody reads it)
 +-- ModelLoadError             500 server_error code=model_load_failed
 +-- InternalError              500 server_error
 +-- UpstreamError              4xx passed through from a backend (its message, type, code)
 +-- BackendError               502 bad_gateway code=backend_error (a backend failed or
 |                                  crashed, an upstream 5xx, a child that could not start)
 +-- BackendUnavailableError    503 service_unavailable code=backend_unavailable (connection
 |                                  refused; a child still starting past the timeout)
 +-- BackendTimeoutError        504 gateway_timeout code=backend_timeout (read timeout)
"""

from __future__ import annotations

from typing import Any


class LlmserveError(Exception):
    """Base of every error the server turns into an OpenAI error body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return error_body(self.message, self.type, param=self.param, code=self.code)


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, the one shape every error takes."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidRequestError(LlmserveError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """A prompt longer than the context. The message is OpenAI's wording (what clients such as
    Codex CLI recognise); `anthropic_message` is Anthropic's (`prompt is too long: N tokens > M
    maximum`, which Claude Code reads to compact a conversation). The error object also carries
    llama-server's `n_prompt_tokens` and `n_ctx`. `n_prompt_tokens` may be a lower bound (a
    text refused by its length before it was tokenized)."""

    code = "context_length_exceeded"

    def __init__(
        self,
        n_prompt_tokens: int,
        n_ctx: int,
        *,
        param: str | None = None,
        what: str = "messages",
        hint: str = "",
    ):
        message = (
            f"This model's maximum context length is {n_ctx} tokens. However, your {what} "
            f"resulted in {n_prompt_tokens} tokens. Please reduce the length of the {what}."
        )
        super().__init__(message + (f" {hint}" if hint else ""), param=param)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx

    @property
    def anthropic_message(self) -> str:
        """Anthropic's wording of the same error."""
        return f"prompt is too long: {self.n_prompt_tokens} tokens > {self.n_ctx} maximum"

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["n_prompt_tokens"] = self.n_prompt_tokens
        body["error"]["n_ctx"] = self.n_ctx
        return body


class InvalidModelNameError(InvalidRequestError):
    code = "invalid_model_name"


class InvalidModelError(InvalidRequestError):
    code = "invalid_model"


class PayloadTooLargeError(LlmserveError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BodyTimeoutError(LlmserveError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class AuthenticationError(LlmserveError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(LlmserveError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ModelNotReadyError(LlmserveError):
    status = 503
    type = "service_unavailable"
    code = "model_not_ready"


class QueueFullError(LlmserveError):
    status = 503
    type = "service_unavailable"
    code = "queue_full"
    retry_after = 1  # seconds, sent as Retry-After


class RequestCancelledError(LlmserveError):
    status = 499
    type = "invalid_request_error"
    code = "cancelled"


class ModelLoadError(LlmserveError):
    status = 500
    type = "server_error"
    code = "model_load_failed"


class InternalError(LlmserveError):
    status = 500
    type = "server_error"


class UpstreamError(LlmserveError):
    """A backend's 4xx, passed through in our error shape with its status."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, *, type_: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        if type_:
            self.type = type_


class BackendError(LlmserveError):
    status = 502
    type = "bad_gateway"
    code = "backend_error"


class BackendUnavailableError(LlmserveError):
    status = 503
    type = "service_unavailable"
    code = "backend_unavailable"


class BackendTimeoutError(LlmserveError):
    status = 504
    type = "gateway_timeout"
    code = "backend_timeout"
