"""Chat and text completions: the request flow, readable in one place (no HTTP here).

request -> the backend serving its model (BackendPool.route, llmserve/backends/pool.py) ->
  InProcessBackend (backends/in_process.py): plan (tools, tool_choice, response_format,
  grammar: 400s) -> resolve model -> a Request (llmserve/request.py) queued on the scheduler
  (llmserve/scheduler.py) -> [engine thread, batch loop: admit (ensure model, render,
  tokenize, check context, take n sequences, prompt KV from the slot / a live sibling / the
  prefix cache, llmserve/sharing.py) -> one llama_decode per step for every sequence ->
  per-sequence sampler -> output processor (UTF-8, stop strings, tool-call parser;
  llmserve/output.py) -> events]; after a choice's Finished its prompt and reply go to the
  prompt cache
  | a ProxyBackend (backends/base.py): the request upstream, its SSE chunks as our events
-> a Generation (llmserve/generation.py) -> the route turns it into JSON or SSE.
"""

from __future__ import annotations

import time
from typing import Any

from llmserve.backends.base import Backend, OnPrompt
from llmserve.backends.pool import BackendPool
from llmserve.chat.plan import check_messages
from llmserve.chat.tools import ToolCallDelta
from llmserve.config import Settings
from llmserve.generation import Generation, Message
from llmserve.metrics import Metrics
from llmserve.output import (
    Emit,
    Finished,
    ReasoningDelta,
    Started,
    TextDelta,
    TokenLogprob,
)
from llmserve.schemas import ChatCompletionRequest, CompletionRequest, RestoreCacheRequest

__all__ = [
    "ChatService", "Finished", "Generation", "Message", "ReasoningDelta", "Started", "TextDelta",
    "TokenLogprob", "ToolCallDelta",
]


class ChatService:
    """Creates chat and text completions on the active (or requested) model, on whichever
    backend serves it."""

    def __init__(self, settings: Settings, backends: BackendPool, metrics: Metrics | None = None):
        self.settings = settings
        self.backends = backends
        self.metrics = metrics  # see _metered

    def backend(self, model: str | None) -> Backend:
        """The backend serving a request's model (None: the active model)."""
        return self.backends.route(model)

    async def chat(self, req: ChatCompletionRequest, on_prompt: OnPrompt | None = None
                   ) -> Generation:
        """Start a chat completion; raises request errors before any output exists.

        on_prompt sees the engine and the prompt's tokens on the engine thread before they are
        evaluated, and returns the tokens to use (in-process models only: the Anthropic routes
        add a prefill and pin cache_control prefixes there)."""
        check_messages(req, self.settings.max_messages)
        return await self.backend(req.model).chat(req, self._wrap, on_prompt)

    async def complete(self, req: CompletionRequest) -> Generation:
        """Start a text completion."""
        return await self.backend(req.model).complete(req, self._wrap)

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt a chat request renders to, its token count and the template used."""
        return await self.backend(req.model).apply_template(req)

    async def count_tokens(self, req: ChatCompletionRequest,
                           on_prompt: OnPrompt | None = None) -> int:
        """The prompt's token count, rendered as chat() renders it, then on_prompt's."""
        return await self.backend(req.model).count_tokens(req, on_prompt)

    async def restore_cache(self, req: RestoreCacheRequest) -> dict[str, Any]:
        """Pre-warm the prompt cache with a conversation's prompt (or just report, dry_run).

        The prompt is rendered exactly as a chat request with these messages and tools; the
        in-process warm-up is a prefill-only request in the batch, so decoding sequences go
        on."""
        return await self.backend(req.model).restore_cache(req, self._wrap)

    def _wrap(self, put: Emit) -> Emit:
        return put if self.metrics is None else _metered(put, self.metrics)


def _metered(emit: Emit, metrics: Metrics) -> Emit:
    """Feed a request's events to the metrics: tokens, time to first text, speed."""
    t0 = time.perf_counter()
    model, first = "", 0.0

    def observe(event: Any) -> None:
        nonlocal model, first
        now = time.perf_counter()
        if isinstance(event, Started):
            model = event.model
            metrics.generation_started(model, event.prompt_tokens)
        elif isinstance(event, TextDelta | ReasoningDelta) and not first:
            first = now
            metrics.first_token(model, now - t0)
        elif isinstance(event, Finished) and event.choice == 0:
            if event.cached_tokens:
                metrics.cache_hit(event.cached_tokens)
            else:
                metrics.cache_miss()
            metrics.generation_finished(
                model, event.completion_tokens, now - first if first else 0.0
            )
        emit(event)

    return observe
