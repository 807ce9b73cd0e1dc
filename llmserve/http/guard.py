"""BodyGuard: a pure ASGI middleware that bounds and checks request bodies before any route.

Every POST/PUT/PATCH body is read here first (then replayed to the app unchanged):
- more than --max_body_bytes (Content-Length or counted while reading): 413;
- not all of it within --timeout_body seconds (a slow-body client): 408;
- a JSON body nested deeper than MAX_JSON_DEPTH (json.loads itself gives up with a
  RecursionError near 1000 levels): 400;
- a JSON number that is not finite (`Infinity`, `NaN`, `1e309`) or a string holding a lone
  UTF-16 surrogate (`"\\ud800"`, valid JSON but no valid Unicode): 400 naming the field.
Bodies that are not JSON pass through; the routes answer those with their own 400.

NOTE: pure ASGI (not BaseHTTPMiddleware), so streaming responses and the http.disconnect
messages that cancel generations pass through untouched once the body has been replayed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.errors import (
    BodyTimeoutError,
    InvalidRequestError,
    LlmserveError,
    PayloadTooLargeError,
)

MAX_JSON_DEPTH = 64  # OpenAI bodies nest ~10 deep; tool schemas a few more
_THREAD_PARSE_BYTES = 1 << 20  # parse bigger bodies off the event loop
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})



def check_json(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 for nesting deeper than max_depth, non-finite numbers and lone surrogates.

    Iterative (no recursion), and cheap on the common cases: ASCII strings and int lists."""
    stack: list[tuple[Any, tuple[str, ...], int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequestError(
                f"the request body nests deeper than {max_depth} levels",
                param=_param(path[:1]), code=_CODE,
            )
        if isinstance(value, dict):
            pairs: Any = value.items()
            for key in value:
                if _bad_text(key) is not None:
                    raise InvalidRequestError(_SURROGATE, param=_param((*path, key)), code=_CODE)
        else:
            pairs = enumerate(value)
        for key, item in pairs:
            kind = type(item)
            if kind is str:
                if _bad_text(item) is not None:
                    raise InvalidRequestError(
                        _SURROGATE, param=_param((*path, str(key))), code=_CODE)
            elif kind is float:
                if not math.isfinite(item):
                    raise InvalidRequestError(
                        "numbers must be finite (got Infinity, NaN or an overflowing literal)",
                        param=_param((*path, str(key))), code=_CODE,
                    )
            elif kind is dict or kind is list:
                stack.append((item, (*path, str(key)), depth + 1))


_CODE = "invalid_request"
_SURROGATE = "text is not valid Unicode (it holds a lone UTF-16 surrogate such as \\ud800)"


def _bad_text(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE
    return None


def _param(path: tuple[str, ...]) -> str | None:
    # NOTE: a key may be the lone surrogate itself: name it escaped, the reply must encode
    return ".".join(p.encode("utf-8", "backslashreplace").decode() for p in path) or None


def _parse(body: bytes) -> Any:
    """The JSON value, or None when the body is not JSON (the route answers that)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise InvalidRequestError(
            f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code=_CODE
        ) from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


class BodyGuard:
    """Reads, bounds and checks each request body, then hands the app a replay of it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, timeout_body: float | None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_body = timeout_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            if body is None:
                return  # the client left while sending
            if body:
                data = (await asyncio.to_thread(_parse, body) if len(body) > _THREAD_PARSE_BYTES
                        else _parse(body))
                if isinstance(data, dict | list):
                    check_json(data)
        except LlmserveError as exc:
            headers = {"Connection": "close"} if exc.status in (408, 413) else None
            await JSONResponse(exc.body(), exc.status, headers=headers)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # NOTE: http.disconnect, which cancels generations

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break
                if declared > limit:
                    raise PayloadTooLargeError(_too_large(limit))
        deadline = None if self.timeout_body is None else time.monotonic() + self.timeout_body
        chunks: list[bytes] = []
        size = 0
        while True:
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                except TimeoutError:
                    raise BodyTimeoutError(
                        f"the request body did not arrive within {self.timeout_body:g} s "
                        "(--timeout_body)"
                    ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(_too_large(limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (--max_body_bytes)"
