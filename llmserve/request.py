"""A generation request as the batch loop advances it: prompt, sampling, stops, limit, n,
keep_alive; its sequences and one output processor per choice. Runs on the engine thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llmserve.cache.manager import PrefixCache
from llmserve.catalog.registry import ModelManager
from llmserve.chat.tools import make_parser
from llmserve.engine.base import Engine, SamplingParams, Seq, as_batch
from llmserve.errors import InvalidRequestError
from llmserve.output import (
    AttachOutputs,
    ChoiceEnd,
    ChoiceStart,
    Coalescer,
    Emit,
    OutputProcessor,
    Predicted,
    Prompt,
    Started,
    TokenBatch,
    TokenLogprob,
)
from llmserve.scheduler import EventStream, check_context, replace_seed
from llmserve.sharing import Wait, keep_slots, resolve, setup, shares

logger = logging.getLogger(__name__)


@dataclass
class Env:
    """What every request needs from the server (built once by the service)."""

    manager: ModelManager
    cache: PrefixCache
    stream_interval: float


@dataclass(eq=False)
class Request:
    """One chat/text completion (or a prefill-only cache warm-up) in the batch loop."""

    id: str
    env: Env
    stream: EventStream
    emit: Emit
    # the model, acquired and held by the service, which built the prompt's plain token ids
    # off the engine thread; the request releases it when it ends
    held: Any
    prompt: Prompt
    keep_alive: float | None
    params: SamplingParams
    max_tokens: int | None
    stops: list[str]
    n: int = 1
    prefill_only: bool = False
    partition: str = ""  # of the prompt cache (llmserve/tenancy.py)
    priority: int = 0  # lower is admitted, resumed and kept first (scheduler.by_priority)
    queued_at: float = 0.0
    raw: Any = None  # the held model (kept after admission, when held is cleared)
    # set at admission
    engine: Any = None
    seqs: list[Seq] = field(default_factory=list)  # the open ones
    all_seqs: list[Seq] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)  # per choice: tokens it may produce
    produced: list[int] = field(default_factory=list)  # per choice: tokens sampled
    _pending: list[Any] = field(default_factory=list)  # the next TokenBatch's items
    _flushed: float = 0.0
    waits: dict[int, Wait] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    started_at: float = 0.0
    preemptions: int = 0
    swapped: dict[int, int] = field(default_factory=dict)  # id(seq) -> tokens swapped out
    _predicted: dict[int, tuple[int, int]] = field(default_factory=dict)  # sent, per choice

    def __post_init__(self) -> None:
        self.raw = self.held

    # -- admission ---------------------------------------------------------------------------

    def admit(self) -> bool:
        """Check the prompt against the model and take n sequences; False: no free ones (the
        model stays held while the request waits). Raises the request's errors (4xx).

        Plain data only: the prompt's tokens were built off the engine thread."""
        raw = self.raw
        try:
            seqs = self._open(raw)
        except BaseException:
            self.held = None
            self.env.manager.release(raw.info.name, None, stamp=False)
            raise
        if seqs is None:
            return False
        self.held = None  # released by finish() from here on
        engine = as_batch(raw)
        keep_slots(raw, self.env.cache)
        tokens = seqs[0].tokens[: seqs[0].n_prompt]
        self.engine, self.seqs, self.all_seqs = engine, list(seqs), seqs
        self.started_at = time.perf_counter()
        if shares(raw):
            for seq in seqs[1:]:  # n > 1: the other choices fork the first one's prompt
                self.waits[id(seq)] = Wait(seqs[0], seq.keep_limit())
        # NOTE: the n choices share the prompt's cells; each gets an even share of the rest
        # (_open refused a max_tokens that cannot fit n times), so the request alone always
        # fits its limits and is never cut short by the KV (it is preempted instead)
        budget = (raw.info.n_ctx - len(tokens)) // self.n
        limit = min(self.max_tokens, budget) if self.max_tokens else budget
        family = self.prompt.tool_family
        max_calls = None if self.prompt.parallel_tools else 1
        # NOTE: built here, used only on the event loop (EventStream delivers TokenBatches
        # to them there): the engine thread never decodes, matches stops or parses tools
        emit = self.stream.local_emit
        self.stream.put(AttachOutputs(tuple(
            OutputProcessor(i, self.stops, limit, make_parser(family, max_calls=max_calls),
                            Coalescer(emit, self.env.stream_interval), self.prompt.reasoning)
            for i in range(self.n)
        )))
        for seq in seqs:
            seq.max_new = limit  # NOTE: a draft never runs past it
        self.limits = [limit] * self.n
        self.produced = [0] * self.n
        self.reasons = [""] * self.n
        self._flushed = time.perf_counter()
        self.emit(Started(raw.info.name, len(tokens), seqs[0].reused))
        return True

    def _open(self, raw: Engine) -> list[Seq] | None:
        engine = as_batch(raw)
        tokens = self.prompt.tokens
        check_context(len(tokens), raw.info.n_ctx)
        if engine.n_parallel < self.n:
            raise RuntimeError("n is larger than --parallel")  # checked before queueing
        if self.n > 1 and self.max_tokens and \
                len(tokens) + self.n * self.max_tokens > raw.info.n_ctx:
            raise InvalidRequestError(
                f"n ({self.n}) choices of max_tokens ({self.max_tokens}) after a prompt of "
                f"{len(tokens)} tokens need {len(tokens) + self.n * self.max_tokens} tokens of "
                f"KV; the context holds {raw.info.n_ctx}: lower n or max_tokens",
                param="max_tokens",
            )
        params = SamplingParams(**{**self.params.__dict__, "grammar": self.prompt.grammar,
                                   "prediction": self.prompt.prediction})
        seqs: list[Seq] = []
        for i in range(self.n):
            seq = engine.open_seq(tokens, replace_seed(params, i), prefill_only=self.prefill_only,
                                  partition=self.partition)
            if seq is None:
                for s in seqs:
                    engine.close_seq(s)
                self.waits.clear()
                return None
            if i == 0:
                # NOTE: before the other choices open, so a sequence only ever waits for
                # one admitted before it (no cycles)
                wait = setup(raw, seq, self.env.cache)
                if wait is not None:
                    self.waits[id(seq)] = wait
            seqs.append(seq)
        return seqs

    def abandon(self) -> None:
        """The request leaves before it was admitted (its client left, or shutdown)."""
        if self.held is not None:
            self.env.manager.release(self.held.info.name, None, stamp=False)
            self.held = None

    def waiting(self, seq: Seq) -> bool:
        """Whether seq still waits for a sibling's prompt (forking from it once it is in)."""
        wait = self.waits.get(id(seq))
        if wait is None:
            return False
        if not resolve(self.raw, seq, wait, self.env.cache):
            return True
        del self.waits[id(seq)]
        return False

    # -- preemption --------------------------------------------------------------------------

    def kv_tokens(self) -> int:
        """Tokens the open sequences need in the KV cache now (shared prefixes counted
        once per sequence: an upper bound)."""
        return sum(len(s.tokens) for s in self.seqs)

    def kv_need(self) -> int:
        """Tokens the open sequences may need by the time they end (their output limits)."""
        return sum(len(s.tokens) + max(self.limits[i] - self.produced[i], 0)
                   for i, s in enumerate(self.all_seqs) if s in self.seqs)

    def preempt(self) -> None:
        """Make room in the KV cache: each open sequence's KV goes to the prefix cache tiers
        (evaluated again instead where the cache cannot take it), and the sequences pause."""
        for seq in self.seqs:
            if seq.paused:
                continue
            if shares(self.raw) and seq.n_past:
                view = self.raw.view(seq)
                if self.env.cache.swap_out(view):
                    self.swapped[id(seq)] = seq.n_past
                view.reset()
            seq.n_past = 0
            seq.paused = True
        self.preemptions += 1

    def resume(self) -> None:
        """Continue after a preemption: restore each sequence's KV from the cache (what is
        missing is evaluated again), so the output is what it would have been."""
        restored = 0
        for seq in self.seqs:
            saved = self.swapped.pop(id(seq), 0)
            if saved and shares(self.raw):
                restored += self.env.cache.swap_in(self.raw.view(seq), seq.tokens[:saved])
            seq.paused = False
        logger.info("resumed %s: %d of %d tokens restored from the prompt cache", self.id,
                    restored, self.kv_tokens())

    # -- progress ----------------------------------------------------------------------------

    def on_token(self, seq: Seq, token: int, piece: bytes | None) -> bool:
        """A token sampled for seq (piece None: end of generation); True when all are done.

        Plain bookkeeping only: the token's bytes go out in the next TokenBatch."""
        i = self.all_seqs.index(seq)
        if self.reasons[i]:
            return self._all_done()
        if i == 0 and self.produced[0] == 0 and hasattr(self.raw, "view"):
            self.env.cache.after_prompt(self.raw.view(seq), seq.tokens[: seq.n_prompt])
        if piece is None:
            self._end_choice(i, "stop")
        else:
            if not self.produced[i]:
                self._pending.append(ChoiceStart(i, seq.reused))
            self.produced[i] += 1
            self._pending.append((i, piece, self._logprob(seq, piece)))
            if self.produced[i] >= self.limits[i]:
                self._end_choice(i, "length")
            elif time.perf_counter() - self._flushed >= self.env.stream_interval \
                    or self.produced[i] == 1:
                self._flush()
        return self._all_done()

    def _flush(self) -> None:
        """Send what the engine produced since the last batch to the event loop."""
        for i, seq in enumerate(self.all_seqs):
            counts = (seq.predicted_accepted, seq.predicted - seq.predicted_accepted)
            if seq.predicted and counts != self._predicted.get(i):
                self._predicted[i] = counts
                # NOTE: before the tokens: a choice the output side ends has them already
                self._pending.insert(0, Predicted(i, *counts))
        if self._pending:
            self.stream.put(TokenBatch(tuple(self._pending)))
            self._pending = []
        self._flushed = time.perf_counter()

    def poll(self) -> bool:
        """Between steps: end the choices the output side ended (a stop string, a finished
        tool call); True when none is left."""
        if not self.reasons:
            return False
        for i in self.stream.ended_choices():
            if not self.reasons[i]:
                self._end_choice(i, "stop", quiet=True)
        return self._all_done()

    def _logprob(self, seq: Seq, piece: bytes) -> TokenLogprob | None:
        if not seq.logprobs:
            return None
        logprob, top = seq.logprobs.pop(0)
        return TokenLogprob(piece, logprob,
                            tuple((bytes(self.raw.token_bytes(t)), lp) for t, lp in top))

    def on_ready(self, seq: Seq) -> bool:
        """A prefill-only sequence holds its prompt: save it; the request is done."""
        self._end_choice(self.all_seqs.index(seq), "stop")
        return True

    def _all_done(self) -> bool:
        return all(self.reasons)

    def _end_choice(self, i: int, reason: str, *, quiet: bool = False) -> None:
        """Close choice i's sequence; unless quiet (the output side ended it already), its
        end goes out with the pending tokens."""
        seq = self.all_seqs[i]
        self.reasons[i] = reason
        if not quiet:
            self._pending.append(ChoiceEnd(i, reason, seq.reused))
            self._flush()
        if i == 0:
            if shares(self.raw):
                # NOTE: stored when the engine is idle or the slot is needed by another
                # conversation: the next turn of this one continues from the live KV
                seq.cache_on_close = True
            else:
                self.env.cache.save(self.raw, seq.tokens[: seq.n_prompt])
        self.waits.pop(id(seq), None)
        self.engine.close_seq(seq)
        self.seqs.remove(seq)

    def finish(self, reason: str) -> None:
        """The request leaves the batch (all done, cancelled, out of KV room or failed)."""
        for i, seq in enumerate(self.all_seqs):
            if seq in self.seqs:
                if reason == "error":
                    self.reasons[i] = "error"
                    self.engine.close_seq(seq)
                    self.seqs.remove(seq)
                else:
                    self._end_choice(i, reason)
        self._flush()
        tokens = self.prompt.tokens
        evaluated = sum(s.n_prompt - s.reused for s in self.all_seqs)
        self.env.cache.tokens_evaluated += evaluated
        logger.info(
            "%s finished (%s): %d prompt + %d completion tokens in %.2f s%s",
            self.id, self.reasons[0] if self.reasons else reason, len(tokens),
            sum(self.produced), time.perf_counter() - self.started_at,
            f" ({self.preemptions} preemptions)" if self.preemptions else "",
        )
        if self.raw is not None:
            self.env.manager.release(self.raw.info.name, self.keep_alive)
        self.stream.end()

