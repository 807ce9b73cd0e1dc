"""The scheduler's step plan with plain sequences (no engine): the token budget, decoding
sequences first, prompts chunked across steps in admission order, paused and waiting
sequences left out."""

from __future__ import annotations

from llmserve.engine.base import SamplingParams, Seq, StepPlan
from llmserve.scheduler import PrefixChoice, choose_prefix, plan_step


def prompt(slot: int, n: int, *, evaluated: int = 0) -> Seq:
    """A sequence of an n-token prompt, `evaluated` of them in the KV already."""
    return Seq(slot, list(range(n)), n, SamplingParams(), n_past=evaluated)


def decoding(slot: int, produced: int = 3) -> Seq:
    """A sequence past its 10-token prompt with one sampled token to evaluate."""
    seq = prompt(slot, 10, evaluated=10 + produced - 1)
    seq.tokens += [7] * produced
    return seq


def run(plan: StepPlan) -> None:
    """What an executor does to the plan's sequences (sampling aside)."""
    for seq, n in plan.items:
        seq.n_past += n


def test_decoding_first_then_prompts_in_order() -> None:
    a, b, c, d = prompt(0, 50), decoding(1), prompt(2, 30), decoding(3)
    plan = plan_step([a, b, c, d], 512)
    assert plan.items == ((b, 1), (d, 1), (a, 50), (c, 30))
    assert plan.n_tokens == 82 and plan.seqs == [b, d, a, c]


def test_budget_respected_and_the_last_prompt_chunked() -> None:
    a, b, c = decoding(0), prompt(1, 100), prompt(2, 100)
    plan = plan_step([a, b, c], 64)
    assert plan.items == ((a, 1), (b, 63))
    assert plan.n_tokens == 64
    assert plan_step([a, b, c], 1).items == ((a, 1),)


def test_decoding_sequences_beyond_the_budget_wait() -> None:
    seqs = [decoding(i) for i in range(4)]
    assert plan_step(seqs, 2).seqs == seqs[:2]


def test_a_long_prompt_goes_in_chunks_across_steps() -> None:
    long, other = prompt(0, 300, evaluated=20), decoding(1)
    long.prefill_only = True
    chunks = []
    while long.pending:
        plan = plan_step([long, other], 128)
        assert plan.items[0] == (other, 1)  # never held back by the prompt
        assert plan.n_tokens <= 128
        chunks.append(dict(plan.items)[long])
        run(plan)
        other.tokens.append(7)  # other sampled its next token (long is prefill-only)
    assert chunks == [127, 127, 26]
    assert long.n_past == 300


def test_paused_waiting_and_finished_sequences_left_out() -> None:
    paused, waiting, done, ready = prompt(0, 10), prompt(1, 10), prompt(2, 10), prompt(3, 10)
    paused.paused = True
    done.n_past = 10  # a prefill-only prompt that is all in
    plan = plan_step([paused, waiting, done, ready], 512, waiting={waiting})
    assert plan.items == ((ready, 10),)
    assert not plan_step([paused, done], 512)
    assert plan_step([], 512) == StepPlan()


def test_order_is_stable() -> None:
    seqs = [decoding(0), prompt(1, 5), decoding(2), prompt(3, 1, evaluated=0), prompt(4, 5)]
    first = plan_step(seqs, 512)
    assert first == plan_step(list(seqs), 512)
    # one token to evaluate counts as decoding (a prompt's last token included)
    assert first.seqs == [seqs[0], seqs[2], seqs[3], seqs[1], seqs[4]]


def test_the_plan_does_not_touch_the_sequences() -> None:
    a, b = decoding(0), prompt(1, 40)
    before = [(s.n_past, list(s.tokens)) for s in (a, b)]
    plan_step([a, b], 16)
    assert [(s.n_past, list(s.tokens)) for s in (a, b)] == before


# -- where a new sequence's prompt KV comes from (choose_prefix) -------------------------------

def test_prefix_nothing_anywhere_is_the_cache_path() -> None:
    assert choose_prefix(0, [], [], 0, 64) == PrefixChoice("cache", 0)
    assert choose_prefix(0, [(1, 0), (2, 0)], [], 0, 64) == PrefixChoice("cache", 0)


def test_prefix_longest_live_sibling_is_copied() -> None:
    assert choose_prefix(10, [(1, 300), (2, 500), (3, 400)], [], 200, 64) == \
        PrefixChoice("sibling", 500, 2)
    # a tie with the cache goes to the sibling (a copy shares cells; a restore copies bytes)
    assert choose_prefix(0, [(1, 256)], [], 256, 64) == PrefixChoice("sibling", 256, 1)


def test_prefix_own_slot_or_cache_beats_a_shorter_sibling() -> None:
    assert choose_prefix(700, [(1, 500)], [], 0, 64) == PrefixChoice("cache", 700)
    assert choose_prefix(0, [(1, 500)], [], 640, 64) == PrefixChoice("cache", 640)


def test_prefix_waits_only_for_a_block_more() -> None:
    # a sibling still evaluating 1000 shared tokens: worth waiting for over 500 live ones
    assert choose_prefix(0, [(1, 500)], [(2, 1000)], 0, 64) == PrefixChoice("wait", 1000, 2)
    # less than a block more than the cache holds: take the cache now
    assert choose_prefix(0, [], [(2, 1000)], 960, 64) == PrefixChoice("cache", 960)
    assert choose_prefix(0, [], [(2, 1024)], 960, 64) == PrefixChoice("wait", 1024, 2)
    # the longest evaluating sibling is the one waited for
    assert choose_prefix(0, [], [(2, 300), (3, 900)], 0, 64) == PrefixChoice("wait", 900, 3)


def test_prefix_llama_disk_never_copies_live_kv() -> None:
    assert choose_prefix(0, [(1, 500)], [], 0, 64, can_copy=False) == PrefixChoice("cache", 0)
