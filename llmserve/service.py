"""Chat and text completions: the request flow, readable in one place (no HTTP here).

request -> plan (tools, tool_choice, response_format, grammar: 400s) -> resolve model ->
a Request (llmserve/request.py) queued on the scheduler (llmserve/scheduler.py) ->
[engine thread, batch loop: admit (ensure model, render, tokenize, check context, take n
sequences, prompt KV from the slot / a live sibling / the prefix cache, llmserve/sharing.py)
-> one llama_decode per step for every sequence -> per-sequence sampler -> output processor
(UTF-8, stop strings, tool-call parser; llmserve/output.py) -> events] -> the route turns them
into JSON or SSE; after a choice's Finished its prompt and reply go to the prompt cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmserve.backends.pool import Gen, ProxyBackend
from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import ModelManager
from llmserve.chat import gbnf
from llmserve.chat.plan import ChatPlan, RenderedChat, extended, plan_chat, render_chat
from llmserve.chat.reasoning import ReasoningFormat, ReasoningSetup, answer_only, setup_for
from llmserve.chat.tools import ToolCallDelta
from llmserve.config import Settings
from llmserve.engine.base import BatchEngine, Engine, SamplingParams, common_prefix
from llmserve.errors import InvalidRequestError
from llmserve.limits import check_text_fits
from llmserve.metrics import Metrics
from llmserve.output import (
    Emit,
    Finished,
    Prompt,
    ReasoningDelta,
    Started,
    TextDelta,
    TokenLogprob,
)
from llmserve.request import Env, Request
from llmserve.scheduler import EventStream, IteratorBatch, Scheduler, check_context
from llmserve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RestoreCacheRequest,
    SamplingFields,
)

__all__ = [
    "Finished", "Generation", "Message", "ReasoningDelta", "Started", "TextDelta", "TokenLogprob",
    "ToolCallDelta",
]

logger = logging.getLogger(__name__)


@dataclass
class Message:
    """A whole chat reply: content, tool calls in OpenAI's shape, how it finished, and its
    reasoning (None: the reply had none)."""

    content: str
    tool_calls: list[dict[str, Any]]
    finished: Finished
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    reasoning: str | None = None


class Generation:
    """A running generation: header data, then TextDelta/ReasoningDelta/ToolCallDelta events,
    and one Finished per choice (each event carries its choice index)."""

    def __init__(self, id_: str, started: Started, stream: EventStream, n: int = 1):
        self.id = id_
        self.created = int(time.time())
        self.model = started.model
        self.prompt_tokens = started.prompt_tokens
        self.cached_tokens = started.cached_tokens
        self.n = n
        self._stream = stream
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]  # filled as it runs

    def cancel(self) -> None:
        """Stop generating within a token."""
        self._stream.cancel()

    async def __aiter__(
        self,
    ) -> AsyncIterator[TextDelta | ReasoningDelta | ToolCallDelta | Finished]:
        # NOTE: the request goes on after the last Finished (it saves the prompt cache); the
        # response does not wait for that.
        done: set[int] = set()
        async for event in self._stream:
            if isinstance(event, TextDelta) and event.logprobs:
                self.logprobs[event.choice].extend(event.logprobs)
            elif isinstance(event, Finished):
                done.add(event.choice)
                if event.choice == 0 and event.cached_tokens is not None:
                    self.cached_tokens = event.cached_tokens  # final once the prompt is in
                if event.choice == 0 and event.prompt_tokens is not None:
                    self.prompt_tokens = event.prompt_tokens  # a proxied backend's usage
            yield event
            if len(done) >= self.n:
                return

    async def collect(self) -> tuple[str, Finished]:
        """Wait for the whole text and the finish event (choice 0)."""
        texts, finishes = await self.collect_texts()
        return texts[0], finishes[0]

    async def collect_texts(self) -> tuple[list[str], list[Finished]]:
        """Every choice's whole text and Finished."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        finishes = [Finished("stop", 0, i) for i in range(self.n)]
        async for event in self:
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
            elif isinstance(event, Finished):
                finishes[event.choice] = event
        return ["".join(p) for p in parts], finishes

    async def collect_message(self) -> Message:
        """Wait for the whole reply (choice 0), tool calls assembled from their deltas."""
        return (await self.collect_messages())[0]

    async def collect_messages(self) -> list[Message]:
        """Every choice's whole reply."""
        parts: list[list[str]] = [[] for _ in range(self.n)]
        thoughts: list[list[str]] = [[] for _ in range(self.n)]
        calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(self.n)]
        finishes = [Finished("stop", 0, i) for i in range(self.n)]
        async for event in self:
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
            elif isinstance(event, ReasoningDelta):
                thoughts[event.choice].append(event.text)
            elif isinstance(event, ToolCallDelta):
                call = calls[event.choice].setdefault(event.index, {
                    "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                })
                call["function"]["arguments"] += event.arguments
            elif isinstance(event, Finished):
                finishes[event.choice] = event
        return [Message("".join(parts[i]), [calls[i][k] for k in sorted(calls[i])], finishes[i],
                        self.logprobs[i], "".join(thoughts[i]) or None)
                for i in range(self.n)]


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
        logprobs=req.logprobs_count(),
        logit_bias=req.logit_biases(),
    )


class ChatService:
    """Creates chat and text completions on the active (or requested) model."""

    def __init__(
        self, settings: Settings, manager: ModelManager, worker: Scheduler, cache: PrefixCache,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.manager = manager
        self.worker = worker
        self.cache = cache
        self.metrics = metrics  # see _metered
        self._adapters: dict[int, IteratorBatch] = {}  # engines without batching (the fake)
        self.env = Env(manager, cache, settings.stream_interval_ms / 1000, self._batch_for)

    def _batch_for(self, engine: Engine) -> BatchEngine:
        if hasattr(engine, "step"):
            return engine  # type: ignore[return-value]
        adapter = self._adapters.get(id(engine))
        if adapter is None or adapter.engine is not engine:
            adapter = self._adapters[id(engine)] = IteratorBatch(engine, self.settings.parallel)
        return adapter

    async def chat(
        self, req: ChatCompletionRequest,
        on_prompt: Callable[[Engine, list[int]], list[int]] | None = None,
    ) -> Generation:
        """Start a chat completion; raises request errors before any output exists.

        on_prompt sees the engine and the prompt's tokens on the engine thread before they are
        evaluated, and returns the tokens to use (the Anthropic routes add a prefill and pin
        cache_control prefixes there)."""
        if (backend := self._backend(req.model)) is not None:
            self._check_messages(req)
            return _proxied(await backend.chat(req, self._wrap), req.n)
        plan = self._plan(req)
        reasoning_format = req.reasoning_format or self.settings.reasoning_format

        def prompt(engine: Engine) -> Prompt:
            rendered, text, reasoning = self._chat_prompt(engine, plan, reasoning_format)
            family = rendered.family
            tokens = _chat_tokens(engine, text)
            if on_prompt is not None:
                tokens = on_prompt(engine, tokens)
            return Prompt(tokens, plan.grammar(family), plan.parser_family(family), reasoning,
                          parallel_tools=plan.parallel)

        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self._start("chatcmpl", req, prompt, max_tokens)

    def chat_tokens(self, engine: Engine, plan: ChatPlan) -> list[int]:
        """The tokens a plan renders to on this engine (engine thread), as chat() does."""
        return _chat_tokens(engine, self._render(engine, plan))

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt a chat request renders to, its token count and the template used."""
        if (backend := self._backend(req.model)) is not None:
            raise InvalidRequestError(
                f"model {backend.name} runs on backend {backend.kind}: its template is not "
                "available here", param="model")
        plan = self._plan(req)
        filename = self.manager.resolve(req.model) if req.model else None

        def job() -> dict[str, Any]:
            engine = self.manager.ensure(filename)
            rendered, text, _ = self._chat_prompt(
                engine, plan, req.reasoning_format or self.settings.reasoning_format)
            return {
                "model": engine.info.name,
                "prompt": text.text,
                "tokens": len(_chat_tokens(engine, text)),
                "template": rendered.origin,
                "tool_call_format": plan.parser_family(rendered.family),
                "grammar": plan.grammar(rendered.family),
            }

        return await self.worker.call(job)

    async def restore_cache(self, req: RestoreCacheRequest) -> dict[str, Any]:
        """Pre-warm the prompt cache with a conversation's prompt (or just report, dry_run).

        The prompt is rendered exactly as a chat request with these messages and tools; the
        warm-up is a prefill-only request in the batch, so decoding sequences go on."""
        if (backend := self._backend(req.model)) is not None:
            return await backend.restore_cache(req)
        plan = self._plan(
            ChatCompletionRequest(model=req.model, messages=req.messages, tools=req.tools)
        )
        filename = self.manager.resolve(req.model) if req.model else None
        start = time.perf_counter()

        def prompt(engine: Engine) -> Prompt:
            return Prompt(_chat_tokens(engine, self._render(engine, plan)))

        if req.dry_run:
            def peek() -> dict[str, Any]:
                engine = self.manager.ensure(filename)
                tokens = prompt(engine).tokens
                check_context(len(tokens), engine.info.n_ctx)
                slots = engine.batch.slots if hasattr(engine, "batch") else []
                live = max((common_prefix(s.live(), tokens) for s in slots), default=0)
                return _warm_result(engine.info.name, len(tokens), self.cache.peek(
                    engine, tokens, live), 0, start)
            return await self.worker.call(peek)
        gen = await self._submit("warm", filename, None, prompt, SamplingParams(), None, [],
                                 prefill_only=True)
        _texts, finishes = await gen.collect_texts()
        cached = finishes[0].cached_tokens or 0
        return _warm_result(gen.model, gen.prompt_tokens, cached, gen.prompt_tokens - cached,
                            start)

    def _chat_prompt(
        self, engine: Engine, plan: ChatPlan, fmt: ReasoningFormat
    ) -> tuple[RenderedChat, RenderedChat, ReasoningSetup | None]:
        """The rendered chat, the prompt to generate from, and how to read the reply."""
        rendered = self._render(engine, plan)
        setup = setup_for(rendered.text, fmt)
        if plan.constrains_answer:
            # NOTE: the grammar matches the answer, not thinking: close what the template opened.
            text, setup = answer_only(rendered.text, setup)
            return rendered, extended(rendered, text), setup
        return rendered, rendered, setup

    def _backend(self, model: str | None) -> ProxyBackend | None:
        """The backend serving a request's model; None for the in-process engine."""
        pool = self.manager.backends
        return pool.route(model) if pool is not None else None

    def _wrap(self, put: Emit) -> Emit:
        return put if self.metrics is None else _metered(put, self.metrics)

    def _plan(self, req: ChatCompletionRequest) -> ChatPlan:
        self._check_messages(req)
        return plan_chat(req)

    def _check_messages(self, req: ChatCompletionRequest) -> None:
        # NOTE: rendering and tokenizing cost grows with the message count (100k messages
        # held the engine thread for minutes); --max_messages bounds it before any work.
        if len(req.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"{len(req.messages)} messages; at most {self.settings.max_messages} per "
                "request (--max_messages)", param="messages",
            )

    def _render(self, engine: Engine, plan: ChatPlan) -> RenderedChat:
        return render_chat(
            engine.info, plan, self.settings.templates_dir, self.settings.chat_template
        )

    async def complete(self, req: CompletionRequest) -> Generation:
        """Start a text completion."""
        if (backend := self._backend(req.model)) is not None:
            return _proxied(await backend.complete(req, self._wrap), req.n)
        text = req.prompt_text()
        if req.grammar is not None:
            gbnf.validate(req.grammar)

        def prompt(engine: Engine) -> Prompt:
            check_text_fits(text, engine.info, "prompt")
            tokens = engine.tokenize(text, add_special=True, parse_special=False)
            if not tokens:  # NOTE: a model without BOS has nothing to condition on
                raise InvalidRequestError(
                    "the prompt is empty and this model adds no BOS token: send at least one "
                    "character", param="prompt",
                )
            return Prompt(tokens, req.grammar)

        return await self._start("cmpl", req, prompt, req.max_tokens)

    async def _start(
        self,
        prefix: str,
        req: SamplingFields,
        build_prompt: Callable[[Engine], Prompt],
        max_tokens: int | None,
    ) -> Generation:
        filename = self.manager.resolve(req.model) if req.model else None
        if req.n > self.settings.parallel:
            raise InvalidRequestError(
                f"n is {req.n} but the server decodes at most {self.settings.parallel} "
                "sequences at once (--parallel)", param="n",
            )
        params = sampling_params(req, self.manager.sampling_defaults(filename))
        if max_tokens is None:
            max_tokens = self.settings.max_tokens
        if params.logit_bias:
            build_prompt = _vocab_checked(build_prompt, params.logit_bias)
        return await self._submit(prefix, filename, req.keep_alive, build_prompt, params,
                                  max_tokens, req.stop_list(), n=req.n)

    async def _submit(
        self, prefix: str, filename: str | None, keep_alive: float | None,
        build_prompt: Callable[[Engine], Prompt], params: SamplingParams,
        max_tokens: int | None, stops: list[str], *, n: int = 1, prefill_only: bool = False,
    ) -> Generation:
        stream = EventStream(asyncio.get_running_loop())
        emit = stream.put if self.metrics is None else _metered(stream.put, self.metrics)
        request = Request(
            f"{prefix}-{uuid.uuid4().hex}", self.env, stream, emit, filename, keep_alive,
            build_prompt, params, max_tokens, stops, n=n, prefill_only=prefill_only,
        )
        self.worker.submit(request)
        try:
            first = await stream.next()  # raises the request's error (404/400) before output
        except BaseException:
            stream.cancel()
            raise
        return Generation(request.id, first, stream, n)


def _proxied(gen: Gen, n: int) -> Generation:
    """A backend's generation as ours (its events are already TextDelta, Finished, ...)."""
    return Generation(gen.id, gen.started, gen.stream, n)


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


def _vocab_checked(
    build_prompt: Callable[[Engine], Prompt], bias: tuple[tuple[int, float], ...]
) -> Callable[[Engine], Prompt]:
    """build_prompt, first checking logit_bias's token ids against the model's vocabulary
    (known once the model is loaded, at admission: still a 400 before any output)."""

    def checked(engine: Engine) -> Prompt:
        n_vocab = engine.info.n_vocab
        bad = sorted(t for t, _ in bias if t >= n_vocab)
        if bad:
            raise InvalidRequestError(
                f"logit_bias names token {bad[0]}, outside the vocabulary of "
                f"{engine.info.name} (token ids 0..{n_vocab - 1})", param="logit_bias",
            )
        return build_prompt(engine)

    return checked


def _warm_result(model: str, prompt: int, cached: int, evaluated: int,
                 start: float) -> dict[str, Any]:
    return {
        "model": model, "prompt_tokens": prompt, "cached_tokens": cached,
        "evaluated_tokens": evaluated, "seconds": round(time.perf_counter() - start, 4),
    }


def _chat_tokens(engine: Engine, rendered: RenderedChat) -> list[int]:
    """The prompt's tokens: template markup with special tokens parsed, client text without
    (chat/client_text.py), so no message can produce a control token."""
    info = engine.info
    tokens: list[int] = []
    for piece, client in rendered.pieces():
        tokens += engine.tokenize(piece, add_special=False, parse_special=not client)
    if info.add_bos and info.bos_token_id is not None and tokens[:1] != [info.bos_token_id]:
        tokens.insert(0, info.bos_token_id)
    return tokens


