"""Speculative decoding's plain logic: draft sources (engine/drafting.py) and the scheduler's
draft sizing (scheduler.draft_wants, best_draft, StepCost, with_drafts). No model."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llmserve.engine.base import SamplingParams, Seq, StepPlan
from llmserve.engine.drafting import (
    PRIOR_RATE,
    NgramIndex,
    PredictionCursor,
    SeqDrafter,
    SourceRates,
    ngram_draft,
)
from llmserve.scheduler import (
    StepCost,
    best_draft,
    draft_wants,
    expected_tokens,
    with_drafts,
)


def test_ngram_draft_continues_the_latest_earlier_occurrence() -> None:
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    # the suffix (1, 2, 3) last occurred before at 6..8, followed by 7, 8
    assert ngram_draft(index, tokens, 3) == [7, 8, 1]
    assert ngram_draft(index, tokens, 1) == [7]


def test_ngram_draft_prefers_the_longest_suffix() -> None:
    index = NgramIndex()
    # (2, 3, 4) last occurred at 8..10 (then 6), but (1, 2, 3, 4) only at 0..3 (then 5)
    tokens = [1, 2, 3, 4, 5, 0, 0, 9, 2, 3, 4, 6, 1, 2, 3, 4]
    assert ngram_draft(index, tokens, 2) == [5, 0]


def test_ngram_draft_needs_three_matching_tokens() -> None:
    assert ngram_draft(NgramIndex(), [5, 1, 2, 6, 1, 2], 4) == []  # a two-token match
    assert ngram_draft(NgramIndex(), [5, 1, 2, 3, 6, 1, 2, 3], 2) == [6, 1]
    assert ngram_draft(NgramIndex(), [1], 4) == []
    assert ngram_draft(NgramIndex(), [1, 2, 3, 1, 2, 3], 0) == []


def test_ngram_index_grows_with_the_sequence() -> None:
    index = NgramIndex()
    tokens = [4, 5, 6, 7]
    assert ngram_draft(index, tokens, 4) == []
    tokens += [4, 5, 6]
    assert ngram_draft(index, tokens, 4) == [7, 4, 5, 6]
    tokens += [9, 4, 5, 6]
    # the newest occurrence of (4, 5, 6) wins: 4 5 6 9 ...
    assert ngram_draft(index, tokens, 2) == [9, 4]


def test_prediction_cursor_follows_the_output() -> None:
    cursor = PredictionCursor([10, 11, 12, 13, 14, 15])
    assert cursor.propose([99], 1, 3) == [10, 11, 12]  # no output yet: the start
    assert cursor.propose([99, 10, 11], 1, 3) == [12, 13, 14]
    # the output leaves the prediction, then comes back to it (by its last three tokens)
    assert cursor.propose([99, 10, 11, 50], 1, 3) == []
    assert cursor.propose([99, 10, 11, 50, 13, 14], 1, 3) == []  # two tokens: too weak
    assert cursor.propose([99, 10, 11, 50, 12, 13, 14], 1, 3) == [15]
    assert cursor.propose([99, 10, 11, 50, 12, 13, 14, 15], 1, 3) == []  # the end


def test_prediction_cursor_resyncs_after_an_insertion() -> None:
    pred = [1, 2, 3, 4, 5, 6, 7, 8]
    cursor = PredictionCursor(pred)
    out = [0]
    assert cursor.propose(out, 1, 2) == [1, 2]
    out += [1, 2, 42, 43]  # the model inserted two tokens
    assert cursor.propose(out, 1, 2) == []
    out += [3, 4]
    assert cursor.propose(out, 1, 3) == []
    out += [5]
    assert cursor.propose(out, 1, 3) == [6, 7, 8]


def test_seq_drafter_sources_and_rates() -> None:
    shared = SourceRates()
    drafter = SeqDrafter(prediction=(5, 6, 7), ngram=True, model=False, shared=shared)
    assert drafter.propose([1, 2], 2, 2) == [5, 6]
    assert drafter.source == "prediction"
    assert drafter.rate == pytest.approx(PRIOR_RATE["prediction"])
    drafter.verified(2, 0)
    low = drafter.rate
    assert low < PRIOR_RATE["prediction"]
    drafter.verified(2, 2)
    assert drafter.rate > low
    for _ in range(200):
        drafter.skipped()  # a source not tried for long drifts back to the model's rate
    assert drafter.rate == pytest.approx(shared.rate("prediction"), abs=0.01)
    for _ in range(1000):
        drafter.skipped()  # which drifts back to the prior
    assert drafter.rate == pytest.approx(PRIOR_RATE["prediction"], abs=0.01)
    # the prediction is used up; prompt lookup takes over
    assert drafter.propose([1, 2, 3, 1, 2, 3, 5, 6, 7, 1, 2, 3], 6, 2) == [5, 6]
    assert drafter.source == "ngram"


def test_a_new_sequence_starts_from_the_models_rate() -> None:
    shared = SourceRates()
    first = SeqDrafter(prediction=(), ngram=True, model=False, shared=shared)
    assert first.propose([1, 2, 3, 9, 1, 2, 3], 0, 4) == [9, 1, 2, 3]
    for _ in range(50):
        first.verified(4, 4)  # lookup pays on this model
    second = SeqDrafter(prediction=(), ngram=True, model=False, shared=shared)
    second.propose([1, 2, 3, 9, 1, 2, 3], 0, 4)
    assert second.rate > 0.95 > PRIOR_RATE["ngram"]
    for _ in range(300):
        first.verified(4, 0)  # then it stops paying
    third = SeqDrafter(prediction=(), ngram=True, model=False, shared=shared)
    third.propose([1, 2, 3, 9, 1, 2, 3], 0, 4)
    assert third.rate < 0.2
    for _ in range(1000):
        third.skipped()  # not drafting at all: the model's record goes back to the prior
    assert shared.rate("ngram") == pytest.approx(PRIOR_RATE["ngram"], abs=0.02)
    assert SeqDrafter(prediction=(), ngram=True, model=False).rate == 0.0  # no source yet


def test_seq_drafter_leaves_lookup_to_the_draft_model() -> None:
    drafter = SeqDrafter(prediction=(), ngram=True, model=True)
    assert drafter.propose([1, 2, 3, 1, 2, 3], 0, 4) == []  # lookup would find [1, 2, 3]
    assert drafter.wants_model


def test_expected_tokens_and_best_draft() -> None:
    assert expected_tokens(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens(1.0, 5) == pytest.approx(6.0)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    def line(c1: float) -> Callable[[int], float]:
        return lambda k: c1 * k

    # a CPU (each drafted token costs about as much as the step): only sure drafts pay
    assert best_draft(0.3, 16, 1.0, line(0.5)) == 0
    assert 1 <= best_draft(0.9, 16, 1.0, line(0.5)) < 16
    # a GPU (drafted tokens nearly free): draft as much as allowed
    assert best_draft(0.9, 16, 1.0, line(0.001)) == 16
    assert best_draft(0.99, 16, 1.0, line(0.5)) > best_draft(0.8, 16, 1.0, line(0.5))
    # the first drafted token dear, the next ones cheap (a CPU's batched kernels): a short
    # draft does not pay, a long one does
    def knee(k: int) -> float:
        return 0.9 + 0.25 * (k - 1)

    assert best_draft(0.8, 1, 1.0, knee) == 0
    assert best_draft(0.8, 16, 1.0, knee) > 4


def test_step_cost_fits_the_steps_seen() -> None:
    cost = StepCost()
    for _ in range(300):
        for n in (1, 4, 16):
            cost.observe(n, 0.002 + 0.001 * n)
    c0, c1 = cost.coefficients()
    assert c0 == pytest.approx(0.002, rel=0.05)
    assert c1 == pytest.approx(0.001, rel=0.05)
    flat = StepCost()
    for _ in range(300):
        for n in (1, 17):
            flat.observe(n, 0.010)
    c0, c1 = flat.coefficients()
    assert c1 > 0 and c1 < c0 / 100


def test_step_cost_measures_decode_steps_by_size() -> None:
    cost = StepCost()
    for _ in range(300):  # prompt chunks: cheap rows, a shallow line
        cost.observe(512, 0.5)
        cost.observe(1, 0.01)
    c0, c1 = cost.coefficients()
    assert cost.time(1) == pytest.approx(c0 + c1)  # no decode step measured yet
    decode = StepPlan(((_seq(0, 10, 3), 1),))
    prefill = StepPlan(((Seq(1, list(range(40)), 40, SamplingParams()), 40),))
    for _ in range(20):
        cost.observe_step(decode, 1, 0.010)
        cost.observe_step(decode, 2, 0.019)
        cost.observe_step(decode, 9, 0.040)
        cost.observe_step(prefill, 40, 0.050)  # not a decode step: the line only
    assert cost.time(1) == pytest.approx(0.010, rel=0.01)
    assert cost.time(2) == pytest.approx(0.019, rel=0.01)  # the measured knee, not the line
    assert cost.time(5) == pytest.approx(0.019 + 0.021 * 3 / 7, rel=0.01)  # interpolated
    assert cost.time(40) == pytest.approx(0.040 + cost.coefficients()[1] * 31, rel=0.01)
    assert cost.time(40) < 0.040 * 40 / 9  # beyond the sizes seen: the line's slope


def _seq(slot: int, n_prompt: int, produced: int, *, max_new: int | None = None,
         drafts: bool = True) -> Seq:
    seq = Seq(slot, list(range(n_prompt + produced)), n_prompt, SamplingParams(),
              n_past=n_prompt + produced - 1)
    seq.max_new = max_new
    seq.drafter = SeqDrafter(prediction=(), ngram=True, model=False) if drafts else None
    return seq


def test_draft_wants_shares_the_budget_and_respects_limits() -> None:
    a, b = _seq(0, 10, 3), _seq(1, 10, 3, max_new=5)
    prompt = Seq(2, list(range(40)), 40, SamplingParams())  # still evaluating its prompt
    plain = _seq(3, 10, 3, drafts=False)
    plan = StepPlan(((a, 1), (b, 1), (plain, 1), (prompt, 20)))
    wanted = draft_wants(plan, 64, 4096)
    # 64 - 23 tokens left, shared by a and b; b may sample 2 more tokens: a draft of 1
    assert wanted == [(a, 20), (b, 1)]
    assert draft_wants(plan, 64, 15) == [(a, 1), (b, 1)]  # the context's end
    assert draft_wants(StepPlan(((a, 1),)), 1, 4096) == []  # no budget left


def test_with_drafts_sizes_by_rate_and_cost() -> None:
    a, b = _seq(0, 10, 3), _seq(1, 10, 3)
    plan = StepPlan(((a, 1), (b, 1)))
    made = with_drafts(plan, [(a, 8), (b, 8)], [[1] * 12, []])
    assert made.draft_of(a) == (1,) * 8 and made.draft_of(b) == ()
    assert made.n_tokens == 10
    cpu = StepCost()
    for _ in range(200):
        for n in (2, 18):
            cpu.observe(n, 0.004 * n)  # every token costs the same: no draft pays
    assert with_drafts(plan, [(a, 8)], [[1] * 8], cpu) is plan
