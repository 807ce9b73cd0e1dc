"""Preemption in the batch loop with plain data (no model, no HTTP): requests that fit the KV
cache alone but not together all finish whole; the newest gives way first, resumes where it
was, and nothing new overtakes a paused request."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from llmserve.engine.base import KVFullError, SamplingParams, Seq, StepPlan
from llmserve.scheduler import Scheduler, _Call, by_priority

TOKEN = 7


class KVEngine:
    """A BatchEngine whose KV holds `cells` tokens over all its sequences."""

    def __init__(self, cells: int, n_parallel: int = 4):
        self.info = SimpleNamespace(n_ctx=cells, name="kv")
        self.cells = cells
        self.n_parallel = n_parallel
        self.n_batch = 512
        self.open: list[Seq] = []
        self.full_steps = 0

    def open_seq(self, prompt: list[int]) -> Seq | None:
        if len(self.open) >= self.n_parallel:
            return None
        seq = Seq(len(self.open), list(prompt), len(prompt), SamplingParams())
        self.open.append(seq)
        return seq

    def execute(self, plan: StepPlan) -> list[tuple[Seq, int, bytes]]:
        if sum(s.n_past for s in self.open) + plan.n_tokens > self.cells:
            self.full_steps += 1
            raise KVFullError("full")
        out = []
        for seq, n in plan.items:
            seq.n_past += n
            if seq.pending == 0:
                seq.tokens.append(TOKEN)
                out.append((seq, TOKEN, b"x"))
        return out

    def close_seq(self, seq: Seq) -> None:
        self.open.remove(seq)


class Stream:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    def end(self) -> None:
        self.ended.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Runner:
    """A request of `prompt` tokens that wants `limit` more."""

    def __init__(self, name: str, engine: KVEngine, prompt: int, limit: int,
                 log: list[str]):
        self.id = name
        self.engine = engine
        self.stream = Stream()
        self.queued_at = 0.0
        self.priority = 0
        self.seqs: list[Seq] = []
        self.prompt = list(range(prompt))
        self.limit = limit
        self.produced = 0
        self.reason = ""
        self.log = log

    def admit(self) -> bool:
        seq = self.engine.open_seq(self.prompt)
        if seq is None:
            return False
        self.seqs = [seq]
        self.log.append(f"admit {self.id}")
        return True

    def kv_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    def kv_need(self) -> int:
        return len(self.prompt) + self.limit

    def preempt(self) -> None:
        for seq in self.seqs:
            self.saved = seq.n_past  # what a prompt cache would restore
            seq.n_past = 0
            seq.paused = True
        self.log.append(f"preempt {self.id}")

    def resume(self) -> None:
        for seq in self.seqs:
            seq.n_past = self.saved
            seq.paused = False
        self.log.append(f"resume {self.id}")

    def waiting(self, seq: Seq) -> bool:
        return False

    def poll(self) -> bool:
        return False

    def on_token(self, seq: Seq, token: int, piece: bytes | None) -> bool:
        self.produced += 1
        return self.produced >= self.limit

    def on_ready(self, seq: Seq) -> bool:
        return True

    def finish(self, reason: str) -> None:
        self.reason = reason
        for seq in self.seqs:
            self.engine.close_seq(seq)
        self.seqs = []
        self.stream.end()


def _run(runners: list[Runner], timeout: float = 120.0) -> Scheduler:
    worker = Scheduler(n_batch=16)
    try:
        for r in runners:
            worker.submit(r)
        deadline = time.monotonic() + timeout
        for r in runners:
            assert r.stream.ended.wait(max(deadline - time.monotonic(), 0.01)), r.id
    finally:
        worker.shutdown(timeout=5)
    return worker


def test_requests_that_fit_alone_all_finish_whole() -> None:
    engine = KVEngine(cells=100)
    log: list[str] = []
    runners = [Runner(f"r{i}", engine, prompt=30, limit=30, log=log) for i in range(4)]
    worker = _run(runners)
    assert [(r.reason, r.produced) for r in runners] == [("done", 30)] * 4
    assert engine.full_steps >= 1 and worker.preemptions >= 1
    preempted = [line.split()[1] for line in log if line.startswith("preempt")]
    assert preempted[0] == "r3"  # the newest gives way first
    assert sorted(preempted) == sorted(line.split()[1] for line in log
                                       if line.startswith("resume"))
    assert all(r.stream.error is None for r in runners)


def test_nothing_new_overtakes_a_paused_request() -> None:
    """While a preempted request waits for room, a later one is not admitted before it."""
    engine = KVEngine(cells=100)
    log: list[str] = []
    first = [Runner(f"r{i}", engine, prompt=40, limit=40, log=log) for i in range(2)]
    late = Runner("late", engine, prompt=10, limit=5, log=log)
    worker = Scheduler(n_batch=16)
    try:
        for r in first:
            worker.submit(r)
        for _ in range(500):
            if any(line.startswith("preempt") for line in log):
                break
            time.sleep(0.01)
        worker.submit(late)
        for r in [*first, late]:
            assert r.stream.ended.wait(120), r.id
    finally:
        worker.shutdown(timeout=5)
    victim = next(line.split()[1] for line in log if line.startswith("preempt"))
    assert log.index(f"resume {victim}") < log.index("admit late")
    assert [(r.reason, r.produced) for r in [*first, late]] == [("done", 40)] * 2 + [("done", 5)]


def test_a_request_alone_that_cannot_fit_ends_with_length() -> None:
    engine = KVEngine(cells=50)
    log: list[str] = []
    runner = Runner("big", engine, prompt=30, limit=40, log=log)
    _run([runner])
    assert runner.reason == "length" and runner.produced == 21  # the last one never evaluated
    assert not any(line.startswith("preempt") for line in log)




def test_the_lowest_priority_gives_way_first() -> None:
    """priority (vLLM's: lower is served first) picks the victim before arrival does."""
    engine = KVEngine(cells=100)
    log: list[str] = []
    runners = [Runner(f"r{i}", engine, prompt=30, limit=30, log=log) for i in range(4)]
    runners[0].priority = 5
    _run(runners)
    assert [(r.reason, r.produced) for r in runners] == [("done", 30)] * 4
    preempted = [line.split()[1] for line in log if line.startswith("preempt")]
    assert preempted[0] == "r0"


def test_priority_orders_admission() -> None:
    engine = KVEngine(cells=100_000, n_parallel=1)
    log: list[str] = []
    head = Runner("head", engine, prompt=10, limit=3000, log=log)
    low = Runner("low", engine, prompt=10, limit=5, log=log)
    high = Runner("high", engine, prompt=10, limit=5, log=log)
    low.priority, high.priority = 1, -1
    worker = Scheduler(n_batch=16)
    try:
        worker.submit(head)
        for _ in range(500):
            if "admit head" in log:
                break
            time.sleep(0.001)
        worker.submit(low)
        worker.submit(high)
        for r in (head, low, high):
            assert r.stream.ended.wait(120), r.id
    finally:
        worker.shutdown(timeout=5)
    assert head.produced == 3000, "head finished before the others queued: make it longer"
    assert [line for line in log if line.startswith("admit")] == \
        ["admit head", "admit high", "admit low"]


def test_by_priority_never_moves_a_request_past_a_call() -> None:
    def req(name: str, priority: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, priority=priority)

    switch = _Call(lambda: None)
    items = [req("a", 0), req("b", -1), switch, req("c", 2), req("d", 0), req("e", -5)]
    order = [getattr(i, "name", "call") for i in by_priority(items)]
    assert order == ["b", "a", "call", "e", "d", "c"]
    assert by_priority([]) == []
