"""Where a new sequence's prompt KV comes from: its own slot, a live sibling, the prompt cache,
or a sibling still evaluating the same prefix (wait for it, then fork).

NOTE: a prefix live in another sequence is copied with llama_memory_seq_cp, which in the
unified KV cache only tags the same cells with a second sequence id: no evaluation, no copy.
Requests that arrive together with one system prompt therefore evaluate it once.
Only KV of the sequence's own prompt-cache partition is reused (llmserve/tenancy.py): the
slots' siblings() and the views' salted fingerprints see no other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmserve.cache.manager import PrefixCache
from llmserve.engine.base import SamplingParams, Seq, common_prefix

logger = logging.getLogger(__name__)


@dataclass
class Wait:
    """seq waits for donor to evaluate its first `tokens` prompt tokens, then forks them."""

    donor: Seq
    tokens: int


def shares(engine: Any) -> bool:
    """Whether the engine's sequences can share KV (the batched llama.cpp engine)."""
    return hasattr(engine, "batch") and hasattr(engine, "view")


def setup(engine: Any, seq: Seq, cache: PrefixCache) -> Wait | None:
    """Give seq the longest prompt prefix available now; or a Wait when a sibling that is
    still evaluating its prompt will soon hold a longer one (by at least a cache block)."""
    if not shares(engine):
        return None
    view = engine.view(seq)
    if cache.mode == "off":
        view.reset()
        seq.reused = 0
        cache.count_reuse(0)
        return None
    prompt = seq.tokens[: seq.n_prompt]
    limit = seq.keep_limit()
    best_slot, best = None, seq.n_past
    pending: tuple[Seq, int] | None = None
    for slot in engine.batch.siblings(seq):
        n = min(common_prefix(slot.live(), prompt), limit)
        if n > best:
            best_slot, best = slot, n
        other = slot.seq
        if other is not None and other.n_past < other.n_prompt:
            ahead = min(common_prefix(other.tokens[: other.n_prompt], prompt), limit)
            if pending is None or ahead > pending[1]:
                pending = (other, ahead)
    cached = min(cache.match(view, prompt).tokens, limit) if cache.mode != "llama_disk" else 0
    if pending is not None and pending[1] >= max(best, cached) + cache.block:
        return Wait(*pending)
    if best_slot is not None and best >= cached and cache.mode != "llama_disk":
        engine.batch.copy(best_slot.id, seq, best)
        cache.count_reuse(best)
        return None
    reused = cache.prepare(view, prompt)
    if seq.n_past > limit:
        engine.batch.trim(seq.slot, limit)
        seq.n_past = limit
    seq.reused = min(reused, limit)
    return None


def resolve(engine: Any, seq: Seq, wait: Wait, cache: PrefixCache) -> bool:
    """Fork from the donor once it holds the prefix; True when seq may evaluate on."""
    donor = wait.donor
    slot = engine.batch.slots[donor.slot]
    if slot.seq is donor and donor.n_past < wait.tokens and not donor.paused:
        return False  # still evaluating (a preempted donor is not waited for)
    n = min(common_prefix(slot.live(), seq.tokens[: seq.n_prompt]), wait.tokens)
    if n > seq.n_past:
        engine.batch.copy(donor.slot, seq, n)
        cache.count_reuse(n)
    return True


def save_slot(engine: Any, cache: PrefixCache, slot: int, tokens: list[int],
              n_prompt: int, partition: str) -> None:
    """Store an idle slot's KV (tokens, the first n_prompt of them a prompt) in the prompt
    cache tiers, in its partition's key space: the batch context's evict_hook."""
    seq = Seq(slot, tokens, min(n_prompt, len(tokens)), SamplingParams(), n_past=len(tokens),
              partition=partition)
    cache.save(engine.view(seq), tokens[:n_prompt])


def keep_slots(engine: Any, cache: PrefixCache) -> None:
    """Have the engine store idle slots' KV through `cache` (once per engine)."""
    if shares(engine) and engine.batch.evict_hook is None:
        engine.batch.evict_hook = lambda slot, tokens, n, part: save_slot(
            engine, cache, slot, tokens, n, part)
