"""The scheduler: one engine thread runs a continuous-batching loop over every request.

Each turn of the loop: run the calls that arrived (tokenize, load, switch...) and admit
waiting requests in arrival order while sequences are free; drop what was cancelled; then one
decode step per model with live sequences: plan_step decides what it evaluates (every decoding
sequence's next token plus prompt chunks within --n_batch), the engine executes that plan, and
each sampled token goes to its request. Where an admitted sequence's prompt KV comes from
(its slot, a live sibling, one still evaluating, the prompt cache) is choose_prefix's
decision, made from plain numbers; sharing.py gathers them and carries it out.

NOTE: llama.cpp contexts are not thread-safe, so this one thread owns all of them; calls and
admissions keep their arrival order, so a model switch still waits for the work before it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from llmserve.engine.base import KVFullError, SamplingParams, Seq, StepPlan
from llmserve.errors import ContextLengthError, QueueFullError
from llmserve.output import AttachOutputs, Emit, Outputs, TokenBatch

logger = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()


class Busy(Exception):
    """A call or admission must wait: the model it would evict still has live sequences."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class EventStream:
    """Events of one request, emitted on the engine thread and consumed on the event loop.

    The engine thread puts plain data (Started, TokenBatch, ...); delivery happens on the
    event loop, where a TokenBatch goes through the request's output processors (decoding,
    stops, reasoning, tool calls) and every event through `wrap` (metrics) into the queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 wrap: Callable[[Emit], Emit] | None = None) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._emit: Emit = wrap(self._queue.put_nowait) if wrap else self._queue.put_nowait
        self.outputs: Outputs | None = None

    @property
    def local_emit(self) -> Emit:
        """Where events made on the event loop go (the output processors' coalescers)."""
        return self._emit

    def put(self, item: Any) -> None:
        """From any thread."""
        # NOTE: the loop may already be closed at shutdown; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item: Any) -> None:
        """On the event loop, in the order the items were put."""
        if item is _END or isinstance(item, _Failure):
            self._queue.put_nowait(item)
        elif isinstance(item, AttachOutputs):
            self.outputs = Outputs(item.processors)
        elif isinstance(item, TokenBatch):
            if self.outputs is None:
                return
            try:
                self.outputs.process(item)
            except Exception as exc:  # NOTE: one request's output bug fails it alone
                logger.error("output processing failed: %r", exc)
                self._queue.put_nowait(_Failure(exc))
                self.cancel()
        else:
            self._emit(item)

    def ended_choices(self) -> frozenset[int]:
        """Choices the output side ended (any thread)."""
        return frozenset(self.outputs.ended) if self.outputs is not None else frozenset()

    def fail(self, exc: BaseException) -> None:
        self.put(_Failure(exc))

    def end(self) -> None:
        self.put(_END)

    def cancel(self) -> None:
        """Ask the request to stop at its next token (or never to start)."""
        self.cancelled.set()

    async def next(self) -> Any:
        """The next event; raises the request's exception; StopAsyncIteration at the end."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended for later readers
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        return await self.next()


class Runner(Protocol):
    """What the loop needs of a request (llmserve.request.Request)."""

    stream: EventStream
    queued_at: float
    priority: int  # lower is served first (vLLM's convention); 0 by default
    engine: Any  # a BatchEngine once admitted
    seqs: list[Seq]  # the open sequences

    def admit(self) -> bool: ...
    def kv_tokens(self) -> int: ...
    def kv_need(self) -> int: ...
    def preempt(self) -> None: ...
    def resume(self) -> None: ...
    def waiting(self, seq: Seq) -> bool: ...
    def poll(self) -> bool: ...
    def on_token(self, seq: Seq, token: int, piece: bytes | None) -> bool: ...
    def on_ready(self, seq: Seq) -> bool: ...
    def finish(self, reason: str) -> None: ...


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class Scheduler:
    """The engine thread: a FIFO of calls and requests, and the batch loop."""

    def __init__(self, max_queue: int = 256, n_batch: int = 512) -> None:
        self.max_queue = max_queue
        self.n_batch = n_batch
        self._cv = threading.Condition()
        self._inbox: deque[Any] = deque()
        self._waiting: deque[Any] = deque()
        self._active: list[Runner] = []
        self._preempted: list[Runner] = []  # paused for KV room, by rank (see _rank)
        self.preemptions = 0
        self._after: list[Callable[[], None]] = []
        self._stopping = False
        self.heartbeat = time.monotonic()  # last time the loop went round
        self.busy_since: float | None = None  # when the current step started
        self.steps = 0
        # NOTE: where the engine thread's time goes: every turn of the loop that had work,
        # and the part of it inside llama_decode (the rest is Python between decodes)
        self.work_seconds = 0.0
        self.decode_seconds = 0.0
        self.observers: list[Callable[[str, float], None]] = []  # metrics hooks
        self._costs: dict[str, StepCost] = {}  # per model: its decode steps' time
        # work for an idle engine thread (storing finished sequences' KV): each call does one
        # piece and says whether it found any
        self.idle_hooks: list[Callable[[], bool]] = []
        self._thread = threading.Thread(target=self._loop, name="llmserve-engine", daemon=True)
        self._thread.start()

    # -- the event-loop side -----------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Calls and requests waiting or running."""
        return len(self._inbox) + len(self._waiting) + len(self._active) + len(self._preempted)

    @property
    def waiting_requests(self) -> int:
        return sum(1 for x in (*self._inbox, *self._waiting) if not isinstance(x, _Call))

    @property
    def active_sequences(self) -> int:
        return sum(len(r.seqs) for r in list(self._active))

    @property
    def preempted_requests(self) -> int:
        """Requests paused until the KV cache has room for them again."""
        return len(self._preempted)

    def liveness(self) -> dict[str, Any]:
        """For /health (cheap, any thread): whether the engine thread runs, and how long since
        its loop last came round (it comes round at least every second when idle)."""
        now = time.monotonic()
        busy = self.busy_since
        return {
            "alive": self._thread.is_alive(),
            "idle": not (self._inbox or self._waiting or self._active or self._preempted),
            "seconds_since_progress": round(now - self.heartbeat, 3),
            "busy_seconds": round(now - busy, 3) if busy is not None else 0.0,
            "steps": self.steps,
            "step_seconds": round(self.work_seconds, 3),
            "decode_seconds": round(self.decode_seconds, 3),
            "queued": self.queued,
            "active_sequences": self.active_sequences,
        }

    def after_each_job(self, hook: Callable[[], None]) -> None:
        """Run hook on the engine thread after every call."""
        self._after.append(hook)

    def _push(self, item: Any) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the scheduler is shut down")
            self._inbox.append(item)
            self._cv.notify()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the engine thread, between decode steps, in arrival order."""
        item = _Call(lambda: fn(*args))
        self._push(item)
        return await asyncio.wrap_future(item.future)

    def submit(self, request: Runner) -> None:
        """Queue a request (503 when --max_queue requests already wait)."""
        if self.waiting_requests >= self.max_queue:
            raise QueueFullError(
                f"{self.max_queue} requests are already waiting for a free sequence; retry later"
            )
        request.queued_at = time.monotonic()
        self._push(request)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the thread (waiting at most timeout seconds for it)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=timeout)

    def cancel_streams(self) -> None:
        """From any thread: every queued or running request stops at its next turn.

        NOTE: shutdown calls this first, so requests stop even while a call holds the thread."""
        with self._cv:
            items = [*self._inbox, *self._waiting, *self._active, *self._preempted]
        for item in items:
            stream = getattr(item, "stream", None)
            if stream is not None:
                stream.cancel()

    def cancel_all(self) -> None:
        """On the engine thread: end every request (shutdown)."""
        for req in [*self._active, *self._preempted]:
            self._end(req, "cancelled")
        for item in list(self._waiting):
            if not isinstance(item, _Call):
                self._waiting.remove(item)
                self._abandon(item)

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not (self._inbox or self._active or self._stopping or self._waiting
                            or self._preempted)
            if idle and self._idle_step():
                self.heartbeat = time.monotonic()
                continue  # NOTE: one piece at a time, so new work waits for one at most
            with self._cv:
                while not (self._inbox or self._active or self._stopping or self._waiting
                           or self._preempted):
                    self._cv.wait(timeout=1.0)
                    self.heartbeat = time.monotonic()
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            if stopping:
                self._stop()
                return
            stepped = False
            turn = time.perf_counter()
            try:
                self._admit()
                self._drop_cancelled()
                stepped = self._step()
            except Exception:  # NOTE: never let the loop die; each request fails alone
                logger.exception("scheduler loop error")
            if stepped:
                self.work_seconds += time.perf_counter() - turn
            self.heartbeat = time.monotonic()
            if not stepped and (self._waiting or self._active or self._preempted):
                with self._cv:  # waiting on a drain or a fork: do not spin
                    if not self._inbox:
                        self._cv.wait(timeout=0.005)

    def _idle_step(self) -> bool:
        for hook in self.idle_hooks:
            self.busy_since = time.monotonic()
            try:
                if hook():
                    return True
            except Exception:  # a hook must never break the loop
                logger.exception("idle hook failed")
            finally:
                self.busy_since = None
        return False

    def _stop(self) -> None:
        self.cancel_all()
        for item in self._waiting:
            if isinstance(item, _Call):
                item.future.cancel()

    def _run_call(self, item: _Call) -> None:
        self.busy_since = time.monotonic()  # NOTE: /health tells a long call from a wedge
        try:
            result = item.fn()
        except Busy:
            raise
        except BaseException as exc:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
        finally:
            self.busy_since = None
            for hook in self._after:
                try:
                    hook()
                except Exception:  # a hook must never break the loop
                    logger.exception("after-call hook failed")

    def _admit(self) -> None:
        # NOTE: preempted requests resume before anything new is admitted (they are older),
        # and while one still waits for room no new request may take it.
        self._resume()
        slots_full = bool(self._preempted)
        for item in by_priority(self._waiting):
            if isinstance(item, _Call):
                try:
                    self._run_call(item)
                except Busy:
                    return  # everything after it waits too (arrival order)
                self._waiting.remove(item)
                continue
            if item.stream.cancelled.is_set():
                self._waiting.remove(item)
                self._abandon(item)  # the client left while it waited: never started
                continue
            if slots_full:
                continue
            try:
                admitted = item.admit()
            except Busy:
                return
            except BaseException as exc:
                self._waiting.remove(item)
                item.stream.fail(exc)
                item.stream.end()
                continue
            if not admitted:
                slots_full = True  # later requests wait; later calls still run
                continue
            self._waiting.remove(item)
            self._active.append(item)
            wait = time.monotonic() - item.queued_at
            for observe in self.observers:
                observe("queue_wait", wait)
            for seq in list(item.seqs):
                if seq.prefill_only and seq.pending == 0:
                    self._ready(item, seq)

    def _resume(self) -> None:
        for req in list(self._preempted):
            if req.stream.cancelled.is_set():
                self._end(req, "cancelled")
                continue
            if not self._room_for(req):
                break  # by rank (priority, then oldest): a later one must not overtake it
            self._preempted.remove(req)
            try:
                req.resume()
            except Exception as exc:
                self._active.append(req)
                self._fail(req, exc)
                continue
            self._active.append(req)

    def _room_for(self, req: Runner) -> bool:
        """Whether req and what runs on its model can all run to their output limits in the
        KV cache; always when nothing else runs there. NOTE: by the limits, not the tokens
        held now, so a resumed request is not preempted again as soon as they grow."""
        engine = req.engine
        n_ctx = int(engine.info.n_ctx)
        running = [r for r in self._active if r.engine is engine]
        need = sum(min(r.kv_need(), n_ctx) for r in [*running, req])
        return not running or need <= n_ctx

    def _preempt(self, req: Runner) -> None:
        """Pause req (its KV swapped out) until there is room; it resumes where it was."""
        self._active.remove(req)
        try:
            req.preempt()
        except Exception as exc:
            self._active.append(req)
            self._fail(req, exc)
            return
        self._preempted.append(req)
        self._preempted.sort(key=_rank)
        self.preemptions += 1
        for observe in self.observers:
            observe("preempted", 1.0)

    @staticmethod
    def _abandon(item: Any) -> None:
        abandon = getattr(item, "abandon", None)
        if abandon is not None:
            abandon()
        item.stream.end()

    def _drop_cancelled(self) -> None:
        for req in list(self._active):
            if req.stream.cancelled.is_set():
                self._end(req, "cancelled")
            elif req.poll():  # NOTE: its output side ended every choice (stop strings)
                self._end(req, "done")

    def _end(self, req: Runner, reason: str) -> None:
        if req in self._active:
            self._active.remove(req)
            req.finish(reason)
        elif req in self._preempted:
            self._preempted.remove(req)
            req.finish(reason)

    def _fail(self, req: Runner, exc: BaseException) -> None:
        """End a request with an error its stream raises (a stream already started ends
        with an error event; see http/openai_routes.py)."""
        if req in self._active:
            logger.error("request %s failed: %r", getattr(req, "id", "?"), exc)
            req.stream.fail(exc)
            self._end(req, "error")

    def _ready(self, req: Runner, seq: Seq) -> None:
        if req.on_ready(seq):
            self._end(req, "stop")

    def _step(self) -> bool:
        by_engine: dict[int, tuple[Any, list[tuple[Runner, Seq]], set[Seq]]] = {}
        for req in self._active:
            engine = req.engine
            entry = by_engine.setdefault(id(engine), (engine, [], set()))
            for seq in req.seqs:
                entry[1].append((req, seq))
                if req.waiting(seq):  # NOTE: resolves a fork whose prefix is in
                    entry[2].add(seq)
        stepped = False
        for engine, pairs, waiting in by_engine.values():
            n_batch = min(self.n_batch, engine.n_batch)
            plan = plan_step([s for _, s in pairs], n_batch, waiting)
            if not plan:
                continue
            stepped = True
            owner = {id(s): r for r, s in pairs}
            propose = getattr(engine, "propose", None)
            if propose is not None:
                wanted = draft_wants(plan, n_batch, int(engine.info.n_ctx))
                cost = self._costs.setdefault(engine.info.name, StepCost())
                if wanted:
                    try:
                        plan = with_drafts(plan, wanted, propose(wanted), cost)
                    except Exception:  # NOTE: drafting is an optimisation: step without it
                        logger.exception("drafting failed")
            self.busy_since = time.monotonic()
            batch = getattr(engine, "batch", None)
            decoded = getattr(batch, "decode_seconds", 0.0)
            try:
                results = engine.execute(plan)
            except KVFullError as exc:
                self._kv_full(engine, exc)
                continue
            except Exception as exc:
                logger.exception("decode step failed")
                for req in dict.fromkeys(owner[id(s)] for s in plan.seqs):
                    self._fail(req, exc)
                continue
            finally:
                self.busy_since = None
                took = getattr(batch, "decode_seconds", 0.0) - decoded
                self.decode_seconds += took
            if propose is not None and took > 0:
                cost.observe_step(plan, getattr(batch, "last_batch_tokens", plan.n_tokens), took)
            self.steps += 1
            log = engine.take_draft_log() if propose is not None else []
            for observe in self.observers:
                observe("batch_tokens", float(plan.n_tokens))
                for source, drafted, accepted in log:
                    observe(f"draft_proposed:{source}", float(drafted))
                    observe(f"draft_accepted:{source}", float(accepted))
            for seq, token, *rest in results:
                req = owner[id(seq)]
                try:
                    piece = rest[0] if rest else self._piece(engine, seq, token)
                    if req in self._active and req.on_token(seq, token, piece):
                        self._end(req, "done")
                except Exception as exc:  # NOTE: one request's output bug fails it alone
                    self._fail(req, exc)
            for seq in plan.seqs:
                req = owner[id(seq)]
                if seq.prefill_only and seq.pending == 0 and req in self._active:
                    self._ready(req, seq)
        return stepped

    def _kv_full(self, engine: Any, exc: KVFullError) -> None:
        """No room for the step: preempt the request on this model with the lowest priority
        (the newest of those), which resumes later; a request alone on its model that still
        does not fit ends with `length` (admission refuses what cannot fit alone)."""
        running = [r for r in self._active if r.engine is engine]
        victim = max(running, key=_rank)
        if len(running) == 1:
            logger.warning("%s; %s alone does not fit: finish_reason length", exc,
                           getattr(victim, "id", "?"))
            self._end(victim, "length")
            return
        logger.info("%s; preempting %s (%d tokens) until there is room", exc,
                    getattr(victim, "id", "?"), victim.kv_tokens())
        self._preempt(victim)

    @staticmethod
    def _piece(engine: Any, seq: Seq, token: int) -> bytes | None:
        if not seq.params.ignore_eos and engine.is_eog(token):
            return None
        return bytes(engine.token_bytes(token))


def _rank(req: Any) -> tuple[int, float]:
    """A request's place in line: its priority, then its arrival (smaller goes first)."""
    return (int(getattr(req, "priority", 0)), float(req.queued_at))


def by_priority(waiting: Iterable[Any]) -> list[Any]:
    """The waiting items in the order admission looks at them: requests by priority (lower
    first), arrival order among equals; calls (load, switch, tokenize...) keep their place,
    and no request moves past a call queued before it (a model switch still waits for the
    work sent before it, and work sent after it still waits for the switch)."""
    out: list[Any] = []
    run: list[Any] = []
    for item in waiting:
        if isinstance(item, _Call):
            out += sorted(run, key=lambda r: int(getattr(r, "priority", 0)))  # NOTE: stable
            run = []
            out.append(item)
        else:
            run.append(item)
    return out + sorted(run, key=lambda r: int(getattr(r, "priority", 0)))


def plan_step(seqs: Iterable[Seq], n_batch: int, waiting: Collection[Seq] = ()) -> StepPlan:
    """The next decode step of one model: which tokens of which sequences, within n_batch.

    Sequences with one token to evaluate (decoding ones, one token each) go first, so a long
    prompt never holds them back for more than one step; prompts fill the rest of the budget
    in the order given (admission order), a long one in chunks across steps. Paused sequences,
    those waiting for a sibling's prefix and those with nothing pending are left out."""
    ready = [s for s in seqs if s.pending > 0 and not s.paused and s not in waiting]
    budget = n_batch
    items: list[tuple[Seq, int]] = []
    for seq in sorted(ready, key=lambda s: s.pending > 1):  # NOTE: stable: order kept
        n = min(seq.pending, budget)
        if n <= 0:
            break
        items.append((seq, n))
        budget -= n
    return StepPlan(tuple(items))


def draft_wants(plan: StepPlan, n_batch: int, n_ctx: int) -> list[tuple[Seq, int]]:
    """Which sequences of a planned step may carry a draft, and how many tokens at most: one
    that drafts and whose item evaluates all its pending tokens and then samples. The step's
    unused budget is shared evenly among them; a draft never runs past the sequence's output
    limit (a draft of k tokens can make k+1) or the context."""
    candidates = [seq for seq, n in plan.items
                  if n == seq.pending and not seq.prefill_only and seq.drafter is not None]
    if not candidates:
        return []
    share = (n_batch - plan.n_tokens) // len(candidates)
    out: list[tuple[Seq, int]] = []
    for seq in candidates:
        left = seq.can_sample()
        k = min(share, n_ctx - len(seq.tokens) - 1, share if left is None else left - 1)
        if k > 0:
            out.append((seq, k))
    return out


class StepCost:
    """A model of one decode step's time by the number of tokens in it.

    Two parts:
      - a line, c0 + c1 * tokens, fitted by least squares on every step seen (the recent
        ones weigh more); the prior is a CPU's until steps of different sizes are seen;
      - the decode steps' own times, per size (each sequence's next token plus its draft,
        every row with logits; a running mean per size). The curve is not a line: on
        2 CPU cores a 2-token step costs 1.9x a 1-token one, a 16-token one 6-10x
        (SmolLM2, Gemma 3 at a 900-token context), on a GPU a 17-token step about one.
    time(n) is the measured time at n when that size has been seen, else interpolated
    between the nearest sizes seen, else extended from the largest with the line's slope.
    Prompt chunks, whose rows have no logits, pull that slope down, so sizes not tried yet
    look cheap: the scheduler tries them and measures them (exploration)."""

    SEEN = 2  # decode steps of a size before its mean is used
    ALPHA = 0.2  # weight of a new decode step in its size's mean

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        # NOTE: prior: 1 token = 1 unit, 16 tokens = 8 units (SmolLM2 on 2 CPU cores)
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        for n, t in ((1, 1.0), (16, 8.0)):
            self._add(n, t * 1e-3, 2.0)
        self._sizes: dict[int, tuple[float, int]] = {}  # tokens -> (mean seconds, steps)
        self._known: list[int] = []  # sorted: the sizes seen SEEN times
        self._line: tuple[float, float] | None = None  # coefficients(), until the next step

    def _add(self, n: float, t: float, w: float) -> None:
        self._w += w
        self._x += w * n
        self._y += w * t
        self._xx += w * n * n
        self._xy += w * n * t

    def observe(self, tokens: int, seconds: float) -> None:
        """One step of `tokens` tokens took `seconds` inside llama_decode (the line only)."""
        for name in ("_w", "_x", "_y", "_xx", "_xy"):
            setattr(self, name, getattr(self, name) * self.decay)
        self._add(float(tokens), seconds, 1.0)
        self._line = None

    def observe_step(self, plan: StepPlan, tokens: int, seconds: float) -> None:
        """A step of plan (`tokens` tokens in all, drafts included) took `seconds` inside
        llama_decode; a decode step (every item one token plus its draft) is also
        measured for its size."""
        self.observe(tokens, seconds)
        if plan.items and all(n == 1 for _, n in plan.items):
            mean, steps = self._sizes.get(tokens, (seconds, 0))
            self._sizes[tokens] = (mean + (seconds - mean) * self.ALPHA, steps + 1)
            if steps + 1 == self.SEEN:
                bisect.insort(self._known, tokens)

    def coefficients(self) -> tuple[float, float]:
        """(c0, c1): the line's fixed time and each token's; both positive."""
        if self._line is None:
            self._line = self._fit()
        return self._line

    def _fit(self) -> tuple[float, float]:
        var = self._w * self._xx - self._x * self._x
        c1 = (self._w * self._xy - self._x * self._y) / var if var > 0 else 0.0
        mean = self._y / self._w
        c1 = max(c1, mean * 1e-3 / max(self._x / self._w, 1.0))
        c0 = max(mean - c1 * self._x / self._w, c1 * 0.1)
        return c0, c1

    def time(self, tokens: int) -> float:
        """The expected seconds of a decode step of `tokens` tokens."""
        c0, c1 = self.coefficients()
        known = self._known
        if not known:
            return c0 + c1 * tokens
        i = bisect.bisect_left(known, tokens)  # known[i] is the first size >= tokens
        if i < len(known) and known[i] == tokens:
            return self._sizes[tokens][0]
        if 0 < i < len(known):
            lo, hi = known[i - 1], known[i]
            t_lo, t_hi = self._sizes[lo][0], self._sizes[hi][0]
            return t_lo + (t_hi - t_lo) * (tokens - lo) / (hi - lo)
        if i == len(known):
            return self._sizes[known[-1]][0] + c1 * (tokens - known[-1])
        return max(self._sizes[known[0]][0] - c1 * (known[0] - tokens), c0)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one step makes from a draft of k tokens, each accepted with chance `rate`
    given the ones before it were: the accepted ones plus the one sampled after them."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


# NOTE: a draft must promise this much more speed than no draft: the acceptance rate is an
# estimate, and a size whose time was extrapolated may cost more than it says.
DRAFT_MARGIN = 1.05


def best_draft(rate: float, k_max: int, base: float, extra: Callable[[int], float]) -> int:
    """How much of a draft to verify: the k (0..k_max) with the most tokens per second,
    a step costing `base` without drafts (this sequence's share) and extra(k) more with k
    drafted tokens. 0 when no draft promises DRAFT_MARGIN times the speed of none."""
    best, best_k = DRAFT_MARGIN / base, 0
    for k in range(1, k_max + 1):
        speed = expected_tokens(rate, k) / (base + extra(k))
        if speed > best:
            best, best_k = speed, k
    return best_k


def with_drafts(plan: StepPlan, wanted: list[tuple[Seq, int]], drafts: list[list[int]],
                cost: StepCost | None = None) -> StepPlan:
    """The plan with the worthwhile part of each draft (at most its sequence's allowance)
    added: sized by the draft source's acceptance so far and the step cost model, never
    below the sequence's draft_min."""
    sampling = sum(1 for seq, n in plan.items if n == seq.pending and not seq.prefill_only)
    n = plan.n_tokens  # the step's tokens with the drafts chosen so far
    base = cost.time(n) / max(sampling, 1) if cost is not None else 0.0  # a seq's share
    made = []
    for (seq, k), draft in zip(wanted, drafts, strict=True):
        if not draft:
            continue
        k = min(k, len(draft))
        if cost is not None and seq.drafter is not None:
            step = cost.time(n)

            def extra(j: int, n: int = n, step: float = step, cost: StepCost = cost) -> float:
                return max(cost.time(n + j) - step, 0.0)

            # NOTE: --draft_min (or the request's) is verified whatever the model says
            best = best_draft(seq.drafter.rate, k, base, extra)
            if best == 0:
                seq.drafter.skipped()
            k = max(best, min(seq.drafter.floor, k))
        if k > 0:
            made.append((seq, tuple(draft[:k])))
            n += k
    return dataclasses.replace(plan, drafts=tuple(made)) if made else plan


@dataclass(frozen=True)
class PrefixChoice:
    """Where a new sequence's prompt KV comes from, as the scheduler decides it (sharing.py
    carries it out). source:
      "sibling"  copy the first `tokens` positions of slot `slot` (live in another sequence
                 of the same partition; llama_memory_seq_cp shares the cells)
      "wait"     the sequence in slot `slot` is still evaluating a prompt that shares
                 `tokens` with this one: wait for it, then fork
      "cache"    keep what its own slot holds, or restore the prompt cache's longer prefix
    """

    source: str
    tokens: int = 0
    slot: int | None = None


def choose_prefix(own: int, live: Iterable[tuple[int, int]],
                  evaluating: Iterable[tuple[int, int]], cached: int, block: int,
                  *, can_copy: bool = True) -> PrefixChoice:
    """The prompt-KV source of a new sequence from plain numbers (every count already capped
    at what the sequence may reuse):
      own         tokens its own slot holds of the prompt
      live        (slot, tokens) another slot holds of the prompt now
      evaluating  (slot, tokens) another sequence's prompt shares, still being evaluated
      cached      tokens the prompt cache tiers can restore
      can_copy    whether live KV may be copied (not with --prompt_cache llama_disk)
    A sibling still evaluating is waited for only when it will hold at least a cache block
    more than anything available now; otherwise the longest of a live sibling (on a tie with
    the cache: the sibling, no restore), the cache or its own slot."""
    best_slot, best = None, own
    for slot, n in live:
        if n > best:
            best_slot, best = slot, n
    ahead = max(evaluating, key=lambda e: e[1], default=None)
    if ahead is not None and ahead[1] >= max(best, cached) + block:
        return PrefixChoice("wait", ahead[1], ahead[0])
    if best_slot is not None and best >= cached and can_copy:
        return PrefixChoice("sibling", best, best_slot)
    return PrefixChoice("cache", max(own, cached))


def replace_seed(params: SamplingParams, i: int) -> SamplingParams:
    """The sampling parameters of choice i of n: a seeded request gets seed+i."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + i)


def check_context(n_prompt: int, n_ctx: int) -> None:
    """400 context_length_exceeded when the prompt leaves no room to generate."""
    if n_prompt >= n_ctx:
        raise ContextLengthError(
            n_prompt, n_ctx, param="messages",
            hint="(or start the server with a larger --n_ctx)",
        )
