"""Chat and text completions: the request flow, readable in one place (no HTTP here).

request -> plan (tools, tool_choice, response_format, grammar: 400s) -> resolve model ->
[worker thread: ensure model, render, tokenize, check context, restore the cached prefix,
generate (with a grammar), detokenize, stop strings, tool-call parser] -> events -> the route
turns them into JSON or SSE; after Finished the job saves the prompt cache.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import ModelManager
from llmserve.chat import gbnf
from llmserve.chat.plan import ChatPlan, RenderedChat, plan_chat, render_chat
from llmserve.chat.stops import StopMatcher
from llmserve.chat.tools import ToolCallDelta, ToolCallParser, make_parser
from llmserve.config import Settings
from llmserve.engine.base import MIN_EVAL, Engine, SamplingParams
from llmserve.errors import ContextLengthError
from llmserve.metrics import Metrics
from llmserve.scheduler import Emit, EventStream, Worker
from llmserve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RestoreCacheRequest,
    SamplingFields,
)

__all__ = ["Finished", "Generation", "Message", "Started", "TextDelta", "ToolCallDelta"]

logger = logging.getLogger(__name__)
Job = Callable[[Emit, threading.Event], None]


@dataclass(frozen=True)
class Started:
    """The prompt was accepted: generation is about to start."""

    model: str
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt and how to treat the output: grammar, tool-call family."""

    tokens: list[int]
    grammar: str | None = None
    tool_family: str | None = None


@dataclass
class Message:
    """A whole chat reply: content, tool calls in OpenAI's shape, and how it finished."""

    content: str
    tool_calls: list[dict[str, Any]]
    finished: Finished


class Generation:
    """A running generation: header data, then TextDelta/ToolCallDelta events, one Finished."""

    def __init__(self, id_: str, started: Started, stream: EventStream):
        self.id = id_
        self.created = int(time.time())
        self.model = started.model
        self.prompt_tokens = started.prompt_tokens
        self.cached_tokens = started.cached_tokens
        self._stream = stream

    def cancel(self) -> None:
        """Stop generating within a token."""
        self._stream.cancel()

    async def __aiter__(self) -> AsyncIterator[TextDelta | ToolCallDelta | Finished]:
        # NOTE: the job goes on after Finished (it saves the prompt cache); the response
        # does not wait for that.
        async for event in self._stream:
            yield event
            if isinstance(event, Finished):
                return

    async def collect(self) -> tuple[str, Finished]:
        """Wait for the whole text and the finish event."""
        parts: list[str] = []
        finished = Finished("stop", 0)
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        return "".join(parts), finished

    async def collect_message(self) -> Message:
        """Wait for the whole reply, tool calls assembled from their deltas."""
        parts: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finished = Finished("stop", 0)
        async for event in self:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, ToolCallDelta):
                call = calls.setdefault(event.index, {
                    "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                })
                call["function"]["arguments"] += event.arguments
            elif isinstance(event, Finished):
                finished = event
        return Message("".join(parts), [calls[i] for i in sorted(calls)], finished)


def sampling_params(
    req: SamplingFields, defaults: Mapping[str, float] | None = None
) -> SamplingParams:
    """The engine's sampling parameters from an OpenAI request.

    defaults (the model's catalog entry) fill the fields the request did not send.
    """
    given = req.model_fields_set

    def pick(name: str) -> Any:
        if defaults and name not in given and name in defaults:
            return defaults[name]
        return getattr(req, name)

    return SamplingParams(
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=int(pick("top_k")),
        min_p=pick("min_p"),
        seed=req.seed,
        presence_penalty=pick("presence_penalty"),
        frequency_penalty=pick("frequency_penalty"),
        repeat_penalty=pick("repeat_penalty"),
        ignore_eos=req.ignore_eos,
    )


def _check_context(n_prompt: int, n_ctx: int) -> None:
    if n_prompt >= n_ctx:
        raise ContextLengthError(
            f"the prompt is {n_prompt} tokens but the model's context is {n_ctx} "
            "tokens; shorten the messages or start the server with a larger --n_ctx",
            param="messages",
        )


class ChatService:
    """Creates chat and text completions on the active (or requested) model."""

    def __init__(
        self, settings: Settings, manager: ModelManager, worker: Worker, cache: PrefixCache
    ):
        self.settings = settings
        self.manager = manager
        self.worker = worker
        self.cache = cache
        self.metrics: Metrics | None = None  # set by create_app; see _metered

    async def chat(self, req: ChatCompletionRequest) -> Generation:
        """Start a chat completion; raises request errors before any output exists."""
        plan = plan_chat(req)

        def prompt(engine: Engine) -> Prompt:
            rendered = self._render(engine, plan)
            family = rendered.family
            return Prompt(
                _chat_tokens(engine, rendered.text), plan.grammar(family),
                plan.parser_family(family),
            )

        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self._start("chatcmpl", req, prompt, max_tokens)

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt a chat request renders to, its token count and the template used."""
        plan = plan_chat(req)
        filename = self.manager.resolve(req.model) if req.model else None

        def job() -> dict[str, Any]:
            engine = self.manager.ensure(filename)
            rendered = self._render(engine, plan)
            return {
                "model": engine.info.name,
                "prompt": rendered.text,
                "tokens": len(_chat_tokens(engine, rendered.text)),
                "template": rendered.origin,
                "tool_call_format": plan.parser_family(rendered.family),
                "grammar": plan.grammar(rendered.family),
            }

        return await self.worker.call(job)

    async def restore_cache(self, req: RestoreCacheRequest) -> dict[str, Any]:
        """Pre-warm the prompt cache with a conversation's prompt (or just report, dry_run).

        The prompt is rendered exactly as a chat request with these messages and tools."""
        plan = plan_chat(
            ChatCompletionRequest(model=req.model, messages=req.messages, tools=req.tools)
        )
        filename = self.manager.resolve(req.model) if req.model else None

        def job() -> dict[str, Any]:
            start = time.perf_counter()
            engine = self.manager.ensure(filename)
            tokens = _chat_tokens(engine, self._render(engine, plan).text)
            _check_context(len(tokens), engine.info.n_ctx)
            cached, evaluated = self.cache.warm(engine, tokens, dry_run=req.dry_run)
            return {
                "model": engine.info.name,
                "prompt_tokens": len(tokens),
                "cached_tokens": cached,
                "evaluated_tokens": evaluated,
                "seconds": round(time.perf_counter() - start, 4),
            }

        return await self.worker.call(job)

    def _render(self, engine: Engine, plan: ChatPlan) -> RenderedChat:
        return render_chat(
            engine.info, plan, self.settings.templates_dir, self.settings.chat_template
        )

    async def complete(self, req: CompletionRequest) -> Generation:
        """Start a text completion."""
        text = req.prompt_text()
        if req.grammar is not None:
            gbnf.validate(req.grammar)

        def prompt(engine: Engine) -> Prompt:
            return Prompt(engine.tokenize(text, add_special=True, parse_special=False),
                          req.grammar)

        return await self._start("cmpl", req, prompt, req.max_tokens)

    async def _start(
        self,
        prefix: str,
        req: SamplingFields,
        build_prompt: Callable[[Engine], Prompt],
        max_tokens: int | None,
    ) -> Generation:
        filename = self.manager.resolve(req.model) if req.model else None
        params = sampling_params(req, self.manager.sampling_defaults(filename))
        stops = req.stop_list()
        gen_id = f"{prefix}-{uuid.uuid4().hex}"

        def job(emit: Emit, cancelled: threading.Event) -> None:
            engine = self.manager.ensure(filename, req.keep_alive)
            prompt = build_prompt(engine)
            tokens = prompt.tokens
            n_ctx = engine.info.n_ctx
            _check_context(len(tokens), n_ctx)
            budget = n_ctx - len(tokens)
            limit = min(max_tokens, budget) if max_tokens else budget
            start = time.perf_counter()
            # a cache hit still re-evaluates the prompt's last MIN_EVAL tokens (see engine.base)
            cached = min(self.cache.prepare(engine, tokens), max(len(tokens) - MIN_EVAL, 0))
            # NOTE: generate() checks the grammar before Started, so a bad one is still a 400.
            output = engine.generate(tokens, dataclasses.replace(params, grammar=prompt.grammar))
            emit(Started(engine.info.name, len(tokens), cached))
            finished = _generate(
                output, stops, limit, cancelled, make_parser(prompt.tool_family),
                _Coalescer(emit, self.settings.stream_interval_ms / 1000),
                on_first=lambda: self.cache.after_prompt(engine, tokens),
            )
            logger.info(
                "%s finished (%s): %d prompt + %d completion tokens in %.2f s",
                gen_id, finished.finish_reason, len(tokens), finished.completion_tokens,
                time.perf_counter() - start,
            )
            emit(finished)
            self.cache.tokens_evaluated += len(tokens) - cached
            self.cache.save(engine, tokens)  # after Finished: off the response's critical path

        stream = self.worker.stream(_metered(job, self.metrics) if self.metrics else job)
        first = await stream.next()  # raises the job's error (404/400) before any output
        return Generation(gen_id, first, stream)


def _metered(job: Job, metrics: Metrics) -> Job:
    """Feed a generation job's events to the metrics: tokens, time to first text, speed."""
    t0 = time.perf_counter()

    def run(emit: Emit, cancelled: threading.Event) -> None:
        model, first = "", 0.0

        def observe(event: Any) -> None:
            nonlocal model, first
            now = time.perf_counter()
            if isinstance(event, Started):
                model = event.model
                metrics.generation_started(model, event.prompt_tokens)
                if event.cached_tokens:
                    metrics.cache_hit(event.cached_tokens)
                else:
                    metrics.cache_miss()
            elif isinstance(event, TextDelta) and not first:
                first = now
                metrics.first_token(model, now - t0)
            elif isinstance(event, Finished):
                metrics.generation_finished(
                    model, event.completion_tokens, now - first if first else 0.0
                )
            emit(event)

        job(observe, cancelled)

    return run


def _chat_tokens(engine: Engine, text: str) -> list[int]:
    info = engine.info
    tokens = engine.tokenize(text, add_special=False, parse_special=True)
    if info.add_bos and info.bos_token_id is not None and tokens[:1] != [info.bos_token_id]:
        tokens.insert(0, info.bos_token_id)
    return tokens


Delta = TextDelta | ToolCallDelta


class _Coalescer:
    """Joins deltas produced within `interval` seconds: text with text, arguments with args.

    NOTE: on a 2-core machine every event-loop and client wake-up preempts a llama.cpp
    compute thread; emitting every few milliseconds instead of every token keeps decode
    speed (vLLM's --stream-interval does the same). The first piece goes out at once.
    """

    def __init__(self, emit: Emit, interval: float):
        self._emit = emit
        self._interval = interval
        self._pending: list[Delta] = []
        self._last = 0.0

    def __call__(self, delta: Delta) -> None:
        last = self._pending[-1] if self._pending else None
        if isinstance(delta, TextDelta) and isinstance(last, TextDelta):
            self._pending[-1] = TextDelta(last.text + delta.text)
        elif (
            isinstance(delta, ToolCallDelta) and isinstance(last, ToolCallDelta)
            and delta.index == last.index and delta.id is None
        ):
            self._pending[-1] = dataclasses.replace(
                last, arguments=last.arguments + delta.arguments
            )
        else:
            self._pending.append(delta)
        now = time.perf_counter()
        if now - self._last >= self._interval:
            self.flush()
            self._last = now

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for delta in pending:
            self._emit(delta)


def _generate(
    tokens: Iterator[tuple[int, bytes]],
    stops: list[str],
    limit: int,
    cancelled: threading.Event,
    parser: ToolCallParser,
    emit: _Coalescer,
    on_first: Callable[[], None] | None = None,
) -> Finished:
    """Run the decode loop on the worker thread, emitting deltas; return the Finished."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = StopMatcher(stops)
    produced = 0
    reason = "stop"

    def out(text: str) -> None:
        for part in parser.feed(text):
            emit(TextDelta(part) if isinstance(part, str) else part)

    try:
        for _token, piece in tokens:
            produced += 1
            if produced == 1 and on_first is not None:
                on_first()  # the context holds exactly the prompt now
            if cancelled.is_set():
                reason = "cancelled"
                break
            out(matcher.feed(decoder.decode(piece)))
            if matcher.stopped:
                break
            if produced >= limit:
                reason = "length"
                break
    finally:
        tokens.close()  # type: ignore[attr-defined]
    if not matcher.stopped:
        out(matcher.feed(decoder.decode(b"", final=True)) + matcher.flush())
    for part in parser.finish():
        emit(TextDelta(part) if isinstance(part, str) else part)
    emit.flush()
    if parser.calls and reason == "stop":
        reason = "tool_calls"
    return Finished(reason, produced)
