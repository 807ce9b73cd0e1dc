"""An OpenAI-compatible HTTP server seen as our events: SSE chunks in, TextDelta /
ReasoningDelta / ToolCallDelta / Finished out; its failures mapped once to our errors.

    connection refused / connect timeout   -> 503 BackendUnavailableError
    read timeout                           -> 504 BackendTimeoutError
    a 4xx                                  -> UpstreamError (same status, its message)
    a 5xx, a cut or malformed stream       -> 502 BackendError (an error event once streaming)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from llmserve.chat.tools import ToolCallDelta
from llmserve.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    LlmserveError,
    UpstreamError,
)
from llmserve.output import Emit, Finished, ReasoningDelta, Started, TextDelta
from llmserve.scheduler import EventStream
from llmserve.schemas import SamplingFields

logger = logging.getLogger(__name__)
# fields only llmserve reads; everything else the client sent goes upstream as it came
OWN_FIELDS = ("keep_alive",)


class ProxyStream(EventStream):
    """An EventStream fed by a task on the event loop; cancel() ends the task."""

    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.task.cancel()


def upstream_error(name: str, status: int, raw: bytes) -> LlmserveError:
    """An upstream error response as ours: 4xx passed through, 5xx a 502."""
    text = raw.decode(errors="replace")
    err: dict[str, Any] = {}
    try:
        body = json.loads(text)
        found = body.get("error", body) if isinstance(body, dict) else None
        if isinstance(found, dict):
            err = found
        elif isinstance(found, str):
            err = {"message": found}
    except ValueError:
        pass
    message = str(err.get("message") or err.get("detail") or text[:500] or f"HTTP {status}")

    def text_or_none(key: str) -> str | None:
        value = err.get(key)
        return value if isinstance(value, str) else None

    if 400 <= status < 500:
        return UpstreamError(status, message, type_=text_or_none("type"),
                             param=text_or_none("param"), code=text_or_none("code"))
    return BackendError(f"backend {name} answered {status}: {message}")


def transport_error(name: str, exc: httpx.HTTPError) -> LlmserveError:
    """A failed exchange with a backend as ours."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendUnavailableError(f"backend {name} is unreachable: {exc or 'connect failed'}")
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeoutError(f"backend {name} did not answer in time ({type(exc).__name__})")
    return BackendError(f"backend {name} failed mid-request: {type(exc).__name__}: {exc}")


def payload(req: SamplingFields, model: str | None, extra: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The request as sent upstream: what the client set, streamed, usage included."""
    body = req.model_dump(mode="json", exclude_unset=True, exclude_none=True, by_alias=True)
    for key in OWN_FIELDS:
        body.pop(key, None)
    if model is not None:
        body["model"] = model
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return {**body, **(extra or {})}


def chunk_events(chunk: dict[str, Any], chat: bool) -> tuple[list[Any], dict[int, str]]:
    """A streamed chunk's events and the finish reasons it carries (by choice)."""
    events: list[Any] = []
    finishes: dict[int, str] = {}
    for choice in chunk.get("choices") or []:
        i = int(choice.get("index") or 0)
        if chat:
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought:
                events.append(ReasoningDelta(thought, i))
            if delta.get("content"):
                events.append(TextDelta(delta["content"], i))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                events.append(ToolCallDelta(int(call.get("index") or 0), call.get("id"),
                                            fn.get("name"), fn.get("arguments") or "", i))
        elif choice.get("text"):
            events.append(TextDelta(choice["text"], i))
        if choice.get("finish_reason"):
            finishes[i] = str(choice["finish_reason"])
    return events, finishes


class Upstream:
    """One OpenAI-compatible server: `api_base` ends in /v1; llama-server's /tokenize and
    /detokenize live beside it at the root."""

    def __init__(self, name: str, api_base: str, api_key: str | None, *,
                 connect_timeout: float, read_timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.name = name
        self.api_base = api_base.rstrip("/")
        self.root = self.api_base.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,  # NOTE: tests pass an httpx.MockTransport
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body, the JSON answer back (errors mapped)."""
        try:
            resp = await self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if resp.status_code >= 400:
            raise upstream_error(self.name, resp.status_code, resp.content)
        try:
            data = resp.json()
        except ValueError as exc:
            raise BackendError(f"backend {self.name} answered with invalid JSON") from exc
        if not isinstance(data, dict):
            raise BackendError(f"backend {self.name} answered with a non-object")
        return data

    async def stream(
        self, path: str, body: dict[str, Any], *, chat: bool, model: str, n: int,
        wrap: Callable[[Emit], Emit], on_end: Callable[[], None],
    ) -> tuple[str, Started, ProxyStream]:
        """Start a streamed generation: (id, Started, the event stream). Errors before the
        first byte of output raise here; later ones end the stream with the error."""
        stream = ProxyStream(asyncio.get_running_loop())
        emit = wrap(stream.put)
        url = f"{self.api_base}{path}"
        stream.task = asyncio.create_task(self._pump(url, body, chat, model, n, stream, emit,
                                                     on_end))
        try:
            first = await stream.next()
        except BaseException:
            stream.cancel()
            raise
        return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", first, stream

    async def _pump(self, url: str, body: dict[str, Any], chat: bool, model: str, n: int,
                    stream: ProxyStream, emit: Emit, on_end: Callable[[], None]) -> None:
        try:
            async with self.client.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise upstream_error(self.name, resp.status_code, await resp.aread())
                emit(Started(model, 0))
                await self._relay(resp.aiter_lines(), chat, n, emit)
            stream.end()
        except httpx.HTTPError as exc:
            stream.fail(transport_error(self.name, exc))
        except LlmserveError as exc:
            stream.fail(exc)
        except asyncio.CancelledError:
            stream.end()
        except Exception as exc:  # NOTE: a malformed stream must still end the response
            logger.exception("backend %s: unexpected failure", self.name)
            stream.fail(BackendError(f"backend {self.name} failed: {exc}"))
        finally:
            on_end()

    async def _relay(self, lines: AsyncIterator[str], chat: bool, n: int, emit: Emit) -> None:
        finishes: dict[int, str] = {}
        usage: dict[str, Any] = {}
        done = False
        start = time.perf_counter()
        async for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                err = chunk["error"]
                message = err.get("message") if isinstance(err, dict) else str(err)
                raise BackendError(f"backend {self.name} failed mid-stream: {message}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            events, ended = chunk_events(chunk, chat)
            for event in events:
                emit(event)
            finishes.update(ended)
        if not done and len(finishes) < n:
            raise BackendError(f"backend {self.name} closed the stream before it finished")
        logger.debug("backend %s: stream done in %.2f s", self.name, time.perf_counter() - start)
        details = usage.get("prompt_tokens_details") or {}
        for i in range(n):
            emit(Finished(
                finishes.get(i, "stop"),
                int(usage.get("completion_tokens") or 0) if i == 0 else 0, i,
                cached_tokens=int(details.get("cached_tokens") or 0) if i == 0 else None,
                prompt_tokens=int(usage.get("prompt_tokens") or 0) if i == 0 else None,
            ))
