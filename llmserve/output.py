"""What a request's events are, and the output processor that turns one sequence's token
bytes into them: UTF-8 decoding, stop strings, reasoning, the tool-call parser, coalescing."""

from __future__ import annotations

import codecs
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmserve.chat.reasoning import ReasoningSetup, ReasoningSplitter
from llmserve.chat.stops import StopMatcher
from llmserve.chat.tools import ToolCallDelta, ToolCallParser

Emit = Callable[[Any], None]


@dataclass(frozen=True)
class Started:
    """The prompt was accepted: generation is about to start."""

    model: str
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the most likely alternatives at its place."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    choice: int = 0
    # the logprobs of the tokens up to this text (when the request asked for them)
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the reply's reasoning (thinking), apart from its content."""

    text: str
    choice: int = 0


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    completion_tokens: int
    choice: int = 0
    cached_tokens: int | None = None  # prompt tokens reused, known once the prompt is in
    stop_sequence: str | None = None  # the stop string that ended the output, if one did
    reasoning_tokens: int = 0  # of completion_tokens, those inside the reasoning
    prompt_tokens: int | None = None  # set when known only at the end (proxied backends)
    # OpenAI Predicted Outputs: tokens of the request's prediction verified as drafts that
    # the output kept, and those it did not
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt and how to treat the output: grammar, tool-call family."""

    tokens: list[int]
    grammar: str | None = None
    tool_family: str | None = None
    reasoning: ReasoningSetup | None = None  # None: no reasoning parsing (text completions)
    parallel_tools: bool = True  # False: the output ends after its first complete tool call
    prediction: tuple[int, ...] = ()  # OpenAI Predicted Outputs, as tokens (a draft source)


Delta = TextDelta | ReasoningDelta | ToolCallDelta


@dataclass(frozen=True)
class ChoiceStart:
    """A choice's first token follows: its prompt KV is in, `cached_tokens` of it reused."""

    choice: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class ChoiceEnd:
    """The engine ended a choice (end of generation, its length limit, cancel, KV)."""

    choice: int
    reason: str
    cached_tokens: int = 0


@dataclass(frozen=True)
class Predicted:
    """A choice's prediction counts so far (speculative decoding's verified drafts)."""

    choice: int
    accepted: int
    rejected: int


@dataclass(frozen=True)
class TokenBatch:
    """What the engine thread produced for one request since its last batch: plain data,
    (choice, token bytes, logprob) per sampled token, and choice ends, in order. Decoding,
    stop strings, reasoning and tool parsing happen where it is delivered (the event loop),
    never on the engine thread."""

    items: tuple[tuple[int, bytes, TokenLogprob | None] | ChoiceStart | ChoiceEnd | Predicted,
                 ...]


@dataclass(frozen=True)
class AttachOutputs:
    """The request's output processors (one per choice), sent before any TokenBatch."""

    processors: tuple[OutputProcessor, ...]


class Outputs:
    """The event-loop side of a request: feeds TokenBatches to the output processors and
    says which choices they ended (a stop string, a finished tool call)."""

    def __init__(self, processors: tuple[OutputProcessor, ...]):
        self.processors = processors
        self.ended: set[int] = set()  # NOTE: read by the engine thread (Request.poll)
        self._cached: dict[int, int] = {}

    def process(self, batch: TokenBatch) -> None:
        for item in batch.items:
            if isinstance(item, ChoiceStart):
                self._cached[item.choice] = item.cached_tokens
                continue
            if isinstance(item, Predicted):
                self.processors[item.choice].predicted = (item.accepted, item.rejected)
                continue
            if isinstance(item, ChoiceEnd):
                if item.choice not in self.ended:
                    self._finish(item.choice, item.reason, item.cached_tokens)
                continue
            choice, piece, logprob = item
            out = self.processors[choice]
            if out.done:
                continue  # sampled before the engine saw that this choice had ended
            reason = out.feed(piece, logprob)
            if reason:
                self._finish(choice, reason, None)
        for out in self.processors:
            out.flush()

    def _finish(self, choice: int, reason: str, cached: int | None) -> None:
        out = self.processors[choice]
        self.ended.add(choice)
        out.emit_finished(reason, cached if cached is not None else self._cached.get(choice))


class Coalescer:
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
            self._pending[-1] = TextDelta(last.text + delta.text, delta.choice,
                                          last.logprobs + delta.logprobs)
        elif isinstance(delta, ReasoningDelta) and isinstance(last, ReasoningDelta):
            self._pending[-1] = ReasoningDelta(last.text + delta.text, delta.choice)
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

    def emit(self, event: Any) -> None:
        """Send an event as it is (after what is pending)."""
        self.flush()
        self._emit(event)


class OutputProcessor:
    """One choice's output: feed it token bytes, then finish() once for its Finished."""

    def __init__(self, choice: int, stops: list[str], limit: int, parser: ToolCallParser,
                 emit: Coalescer, reasoning: ReasoningSetup | None = None):
        self.choice = choice
        self.limit = limit
        self.produced = 0
        self.reasoning_tokens = 0
        self.predicted = (0, 0)  # (accepted, rejected) prediction tokens (Predicted)
        self._undecided = 0  # tokens of markup that may still open reasoning
        self.done = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(stops)
        self._parser = parser
        self._emit = emit
        self._logprobs: list[TokenLogprob] = []  # not yet attached to a TextDelta
        self._splitter = ReasoningSplitter(reasoning) if reasoning is not None else None

    def _out(self, text: str, *, final: bool = False) -> None:
        if self._splitter is None:
            parts = [(False, text)]
        else:
            # NOTE: the tool-call parser sees only the text after (outside) the reasoning.
            parts = self._splitter.feed(text)
            if final:
                parts += self._splitter.finish()
        for thinking, piece in parts:
            if thinking:
                self._emit(ReasoningDelta(piece, self.choice))
            else:
                for part in self._parser.feed(piece):
                    self._send(part)

    def _send(self, part: str | ToolCallDelta) -> None:
        if isinstance(part, str):
            logprobs, self._logprobs = tuple(self._logprobs), []
            self._emit(TextDelta(part, self.choice, logprobs))
        else:
            self._emit(dataclasses.replace(part, choice=self.choice) if self.choice else part)

    def feed(self, piece: bytes, logprob: TokenLogprob | None = None) -> str | None:
        """One sampled token's bytes; returns the finish reason once the output is complete."""
        self.produced += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        splitter = self._splitter
        blocks = splitter.blocks if splitter else 0
        self._out(self._matcher.feed(self._decoder.decode(piece)))
        if splitter and (splitter.thinking or splitter.blocks != blocks):
            self.reasoning_tokens += 1 + self._undecided
            self._undecided = 0
        elif splitter:
            self._undecided = self._undecided + 1 if splitter.undecided else 0
        if self._matcher.stopped or self._parser.done:
            return "stop"  # finish() makes it tool_calls when calls were made
        if self.produced >= self.limit:
            return "length"
        return None

    def flush(self) -> None:
        """Send what the coalescer holds (at the end of each delivered batch)."""
        self._emit.flush()

    def emit_finished(self, reason: str, cached_tokens: int | None = None) -> None:
        """finish() and send its Finished event."""
        finished = self.finish(reason, cached_tokens)
        self._emit.flush()
        self._emit.emit(finished)

    def finish(self, reason: str, cached_tokens: int | None = None) -> Finished:
        """Flush what is held back (UTF-8 tail, stop-string candidates, parser) and end."""
        self.done = True
        tail = ""
        if not self._matcher.stopped:
            tail = self._matcher.feed(self._decoder.decode(b"", final=True)) + self._matcher.flush()
        self._out(tail, final=True)
        for part in self._parser.finish():
            self._send(part)
        if self._logprobs:  # NOTE: tokens whose text was held back or became a tool call
            self._send("")
        self._emit.flush()
        if self._parser.calls and reason == "stop":
            reason = "tool_calls"
        return Finished(reason, self.produced, self.choice, cached_tokens, self._matcher.matched,
                        self.reasoning_tokens, accepted_prediction_tokens=self.predicted[0],
                        rejected_prediction_tokens=self.predicted[1])
