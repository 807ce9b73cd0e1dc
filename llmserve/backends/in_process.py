"""The in-process engine as a backend: the models of the models dir, run in this process on the
one engine thread (llmserve/scheduler.py) through llmserve/engine/ (the only llama_cpp user).

    chat / complete   the request's plan checked (tools, tool_choice, response_format,
                      grammar: 400s); the model loaded and held (an engine-thread call); the
                      prompt rendered and tokenized on a worker thread; then a Request
                      (llmserve/request.py) with plain token ids submitted to the Scheduler,
                      which finds its KV at admission (sharing.py, cache/)
    restore_cache     a prefill-only Request (dry_run: the prefix cache asked, nothing run)
    apply_template, count_tokens, tokenize, detokenize   on a worker thread, the model held
    embed             tokenized on a worker thread; a 64-token chunk per engine-thread call
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from llmserve.backends.base import OnPrompt, Tokens, Wrap
from llmserve.cache.manager import PrefixCache, in_partition
from llmserve.catalog.registry import ModelManager
from llmserve.chat import constraints
from llmserve.chat.plan import (
    ChatPlan,
    RenderedChat,
    check_messages,
    extended,
    plan_chat,
    render_chat,
)
from llmserve.chat.reasoning import ReasoningFormat, ReasoningSetup, answer_only, setup_for
from llmserve.config import Settings
from llmserve.engine.base import Engine, SamplingParams, common_prefix
from llmserve.errors import ContextLengthError, InvalidRequestError, RequestCancelledError
from llmserve.generation import Generation
from llmserve.limits import TOKENIZE_CONTEXTS, check_text_fits, check_token_ids
from llmserve.metrics import Metrics
from llmserve.output import Prompt
from llmserve.request import Env, Request
from llmserve.scheduler import EventStream, Scheduler, check_context
from llmserve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Prediction,
    RestoreCacheRequest,
    SamplingFields,
)
from llmserve.tenancy import request_partition
from llmserve.vectors import Embeddings, unit_float32

T = TypeVar("T")

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


class InProcessBackend:
    """Every model of the models dir (by file name or catalog alias), in this process."""

    kind = "llama_cpp"
    alias: str | None = None  # NOTE: its active model is ModelManager.default_name

    def __init__(
        self, settings: Settings, manager: ModelManager, worker: Scheduler, cache: PrefixCache,
        metrics: Metrics,
    ):
        self.settings = settings
        self.manager = manager
        self.worker = worker
        self.cache = cache
        self.metrics = metrics
        # NOTE: one input at a time goes through a model's embedding context (its KV holds
        # the input being embedded)
        self._embedding = asyncio.Lock()
        self.env = Env(manager, cache, settings.stream_interval_ms / 1000)

    def partition(self, salt: str | None) -> str:
        """The prompt-cache partition of the request being served (its key, its cache_salt):
        llmserve/tenancy.py."""
        return request_partition(salt, self.settings.share_prompt_cache)

    def _filename(self, model: str | None) -> str | None:
        """A request's model as a file name (400/404 on bad names); None: the active one."""
        return self.manager.resolve(model) if model else None

    # --- switching ------------------------------------------------------------------------------

    def served_name(self, model: str) -> str:
        return self.manager.resolve(model)

    async def load(self, served: str) -> None:
        await self.worker.call(self.manager.ensure, served)

    # --- chat and text completions ------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, wrap: Wrap,
                   on_prompt: OnPrompt | None = None) -> Generation:
        """Start a chat completion; raises request errors before any output exists.

        on_prompt sees the engine and the prompt's tokens (on a worker thread, with the rest
        of the prompt's building) before they are evaluated, and returns the tokens to use
        (the Anthropic routes add a prefill and pin cache_control prefixes there)."""
        plan = self._plan(req)
        reasoning_format = req.reasoning_format or self.settings.reasoning_format

        def prompt(engine: Engine) -> Prompt:
            rendered, text, reasoning = self._chat_prompt(engine, plan, reasoning_format)
            family = rendered.family
            tokens = chat_tokens(engine, text)
            if on_prompt is not None:
                tokens = on_prompt(engine, tokens)
            return Prompt(tokens, plan.grammar(family), plan.parser_family(family), reasoning,
                          parallel_tools=plan.parallel,
                          prediction=prediction_tokens(engine, req.prediction))

        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self._start("chatcmpl", req, prompt, max_tokens, wrap)

    def chat_tokens(self, engine: Engine, plan: ChatPlan) -> list[int]:
        """The tokens a plan renders to on this engine, as chat() does."""
        return chat_tokens(engine, self._render(engine, plan))

    async def apply_template(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt a chat request renders to, its token count and the template used."""
        plan = self._plan(req)
        filename = self._filename(req.model)

        def job(engine: Engine) -> dict[str, Any]:
            rendered, text, _ = self._chat_prompt(
                engine, plan, req.reasoning_format or self.settings.reasoning_format)
            return {
                "model": engine.info.name,
                "prompt": text.text,
                "tokens": len(chat_tokens(engine, text)),
                "template": rendered.origin,
                "tool_call_format": plan.parser_family(rendered.family),
                "grammar": plan.grammar(rendered.family),
            }

        return await self._off_thread(filename, job)

    async def count_tokens(self, req: ChatCompletionRequest,
                           on_prompt: OnPrompt | None = None) -> int:
        """The prompt's token count as chat() renders it (before the answer-only cut of a
        constrained reply), then on_prompt's."""
        plan = plan_chat(req)
        filename = self._filename(req.model)

        def job(engine: Engine) -> int:
            tokens = self.chat_tokens(engine, plan)
            return len(on_prompt(engine, tokens) if on_prompt is not None else tokens)

        return int(await self._off_thread(filename, job))

    async def restore_cache(self, req: RestoreCacheRequest, wrap: Wrap) -> dict[str, Any]:
        """Pre-warm the prompt cache with a conversation's prompt (or just report, dry_run).

        The prompt is rendered exactly as a chat request with these messages and tools; the
        warm-up is a prefill-only request in the batch, so decoding sequences go on."""
        plan = self._plan(
            ChatCompletionRequest(model=req.model, messages=req.messages, tools=req.tools)
        )
        filename = self._filename(req.model)
        start = time.perf_counter()
        part = self.partition(req.cache_salt)

        def prompt(engine: Engine) -> Prompt:
            return Prompt(chat_tokens(engine, self._render(engine, plan)))

        if req.dry_run:
            def peek() -> dict[str, Any]:
                engine = self.manager.ensure(filename)
                tokens = prompt(engine).tokens
                check_context(len(tokens), engine.info.n_ctx)
                slots = engine.batch.slots if hasattr(engine, "batch") else []
                live = max((common_prefix(s.live(), tokens) for s in slots
                            if s.partition == part), default=0)
                return _warm_result(engine.info.name, len(tokens), self.cache.peek(
                    in_partition(engine, part), tokens, live), 0, start)
            return await self.worker.call(peek)
        gen = await self._submit("warm", filename, None, prompt, SamplingParams(), None, [],
                                 wrap, prefill_only=True, partition=part)
        _texts, finishes = await gen.collect_texts()
        cached = finishes[0].cached_tokens or 0
        return _warm_result(gen.model, gen.prompt_tokens, cached, gen.prompt_tokens - cached,
                            start)

    async def complete(self, req: CompletionRequest, wrap: Wrap) -> Generation:
        """Start a text completion."""
        text = req.prompt_text()
        grammar = constraints.gbnf(req.grammar) if req.grammar is not None else None

        def prompt(engine: Engine) -> Prompt:
            check_text_fits(text, engine.info, "prompt")
            tokens = engine.tokenize(text, add_special=True, parse_special=False)
            if not tokens:  # NOTE: a model without BOS has nothing to condition on
                raise InvalidRequestError(
                    "the prompt is empty and this model adds no BOS token: send at least one "
                    "character", param="prompt",
                )
            return Prompt(tokens, grammar)

        return await self._start("cmpl", req, prompt, req.max_tokens, wrap)

    def _plan(self, req: ChatCompletionRequest) -> ChatPlan:
        check_messages(req, self.settings.max_messages)
        return plan_chat(req)

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

    def _render(self, engine: Engine, plan: ChatPlan) -> RenderedChat:
        return render_chat(
            engine.info, plan, self.settings.templates_dir, self.settings.chat_template
        )

    async def _start(
        self,
        prefix: str,
        req: SamplingFields,
        build_prompt: Callable[[Engine], Prompt],
        max_tokens: int | None,
        wrap: Wrap,
    ) -> Generation:
        filename = self._filename(req.model)
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
                                  max_tokens, req.stop_list(), wrap, n=req.n,
                                  partition=self.partition(req.cache_salt),
                                  priority=req.priority)

    async def _submit(
        self, prefix: str, filename: str | None, keep_alive: float | None,
        build_prompt: Callable[[Engine], Prompt], params: SamplingParams,
        max_tokens: int | None, stops: list[str], wrap: Wrap, *, n: int = 1,
        prefill_only: bool = False, partition: str = "", priority: int = 0,
    ) -> Generation:
        # NOTE: the prompt is rendered and tokenized here, off the engine thread (llama.cpp's
        # tokenizer only reads the vocabulary, as llama-server's HTTP threads use it), on a
        # model held resident for the request: the engine thread gets plain token ids.
        engine = await self.worker.call(self.manager.acquire, filename)
        try:
            prompt = await asyncio.to_thread(build_prompt, engine)
        except BaseException:
            await self.worker.call(self._release, engine, False)
            raise
        # NOTE: wrap (metrics) watches the events where they are made: on the event loop
        stream = EventStream(asyncio.get_running_loop(), wrap)
        request = Request(
            f"{prefix}-{uuid.uuid4().hex}", self.env, stream, stream.put, engine, prompt,
            keep_alive, params, max_tokens, stops, n=n, prefill_only=prefill_only,
            partition=partition, priority=priority,
        )
        try:
            self.worker.submit(request)
        except BaseException:
            await self.worker.call(self._release, engine, False)
            raise
        try:
            first = await stream.next()  # raises the request's error (404/400) before output
        except BaseException:
            stream.cancel()
            raise
        return Generation(request.id, first, stream, n)

    def _release(self, engine: Engine, stamp: bool = True) -> None:
        """On the engine thread: the hold of _off_thread or _submit ends."""
        self.manager.release(engine.info.name, None, stamp=stamp)

    async def _off_thread(self, filename: str | None, fn: Callable[[Engine], T]) -> T:
        """fn(engine) on a worker thread (tokenizing, rendering), the model loaded by an
        engine-thread call and held resident meanwhile: nothing long blocks decode steps."""
        engine = await self.worker.call(self.manager.acquire, filename)
        try:
            return await asyncio.to_thread(fn, engine)
        finally:
            await self.worker.call(self._release, engine)

    # --- tokens ---------------------------------------------------------------------------------

    async def tokenize(self, model: str | None, content: str, *, add_special: bool,
                       parse_special: bool, with_pieces: bool) -> Tokens:
        """Text to token ids with the model's tokenizer; with_pieces gives llama-server's
        `{"id", "piece"}` items instead."""
        filename = self._filename(model)

        def job(engine: Engine) -> Tokens:
            check_text_fits(content, engine.info, "content", TOKENIZE_CONTEXTS)
            tokens = engine.tokenize(content, add_special=add_special, parse_special=parse_special)
            if not with_pieces:
                return tokens
            return [{"id": t, "piece": piece_json(token_piece(engine, t))} for t in tokens]

        return await self._off_thread(filename, job)

    async def detokenize(self, model: str | None, tokens: list[int]) -> str:
        """Token ids to text; special tokens are rendered (llama-server does the same)."""
        filename = self._filename(model)

        def job(engine: Engine) -> str:
            most = TOKENIZE_CONTEXTS * engine.info.n_ctx
            if len(tokens) > most:
                raise InvalidRequestError(
                    f"{len(tokens)} tokens; at most {most} ({TOKENIZE_CONTEXTS} contexts) per "
                    "request", param="tokens",
                )
            check_token_ids(tokens, engine.info.n_vocab, "tokens")
            return engine.detokenize(tokens, special=True)

        return await self._off_thread(filename, job)

    # --- embeddings -----------------------------------------------------------------------------

    async def _embed_one(self, engine: Engine, tokens: list[int], check: Callable[[], None]
                         ) -> list[float]:
        """One input's embedding, evaluated a chunk per engine call."""
        check()
        start = getattr(engine, "embed_session", None)
        if start is None:  # an engine embedding in one call (the tests' fake)
            [vector] = await self.worker.call(engine.embed, [tokens])
            return vector
        session = await self.worker.call(start, tokens)
        # NOTE: a chunk per call: decode steps of running streams go on between them
        while not await self.worker.call(session.step):
            check()
        return list(session.vector)

    async def embed(
        self, req: EmbeddingRequest, cancelled: threading.Event | None = None
    ) -> Embeddings:
        """Normalised embeddings for every input of the request; stops between inputs once
        `cancelled` is set (the client went away)."""
        filename = self.manager.resolve(req.model) if req.model else None
        inputs = req.input
        if isinstance(inputs, list) and not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if isinstance(inputs, list) and len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input"
            )

        def check() -> None:
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelledError("the client went away; embeddings stopped")

        async with self._embedding:
            engine = await self.worker.call(self.manager.acquire, filename)  # held until release
            try:
                batch = await asyncio.to_thread(_token_lists, engine, req, check)
                vectors = [await self._embed_one(engine, tokens, check) for tokens in batch]
            finally:
                await self.worker.call(self._release, engine)
        total = sum(len(t) for t in batch)
        self.metrics.embedded(engine.info.name, total)
        result = Embeddings(engine.info.name, [unit_float32(v) for v in vectors], total)
        width = len(result.vectors[0]) // 4
        if req.dimensions is not None and req.dimensions != width:
            raise InvalidRequestError(
                f"this model's embeddings have {width} dimensions; "
                f"`dimensions` {req.dimensions} is not supported",
                param="dimensions",
            )
        return result


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
        draft_max=req.draft_max,
        draft_min=req.draft_min,
    )


def prediction_tokens(engine: Engine, prediction: Prediction | None) -> tuple[int, ...]:
    """A Predicted Outputs text as the tokens it drafts (as client text: no control tokens);
    no output is longer than the context, so neither is a useful prediction."""
    if prediction is None:
        return ()
    text = prediction.text()
    if engine.info.max_token_bytes:  # NOTE: never tokenize more than could fit
        text = text[: engine.info.n_ctx * engine.info.max_token_bytes]
    tokens = engine.tokenize(text, add_special=False, parse_special=False)
    return tuple(tokens[: engine.info.n_ctx])


def chat_tokens(engine: Engine, rendered: RenderedChat) -> list[int]:
    """The prompt's tokens: template markup with special tokens parsed, client text without
    (chat/client_text.py), so no message can produce a control token."""
    info = engine.info
    tokens: list[int] = []
    for piece, client in rendered.pieces():
        tokens += engine.tokenize(piece, add_special=False, parse_special=not client)
    if info.add_bos and info.bos_token_id is not None and tokens[:1] != [info.bos_token_id]:
        tokens.insert(0, info.bos_token_id)
    return tokens


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


def token_piece(engine: Engine, token: int) -> bytes:
    """A token's bytes, special tokens as their text (engines without the method: its text)."""
    piece = getattr(engine, "token_piece", None)
    if callable(piece):
        return bytes(piece(token))
    return engine.detokenize([token], special=True).encode("utf-8")


def piece_json(raw: bytes) -> str | list[int]:
    """A piece as llama-server writes it: a string if valid UTF-8, else its byte values."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _token_lists(
    engine: Engine, req: EmbeddingRequest, check: Callable[[], None]
) -> list[list[int]]:
    """On a worker thread, the model held: every input as a checked token list."""
    raw = req.input
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [[x for x in raw if isinstance(x, int)]]  # one token array
    else:
        items = [x for x in raw if isinstance(x, str | list)]
    n_ctx = engine.info.n_ctx
    out: list[list[int]] = []
    for i, item in enumerate(items):
        param = "input" if len(items) == 1 else f"input.{i}"
        check()
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError("input strings must not be empty", param=param)
            check_text_fits(item, engine.info, param)
            tokens = engine.tokenize(item, add_special=True, parse_special=False)
        else:
            check_token_ids(item, engine.info.n_vocab, param)
            tokens = item
        if not tokens:
            raise InvalidRequestError("input must hold at least one token", param=param)
        if len(tokens) > n_ctx:
            raise ContextLengthError(len(tokens), n_ctx, param=param, what=f"input {i}")
        out.append(tokens)
    return out
