"""Carrying out where a new sequence's prompt KV comes from (the scheduler's choose_prefix
decides): its own slot, a live sibling, the prompt cache, or a sibling still evaluating the
same prefix (wait for it, then fork).

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
from llmserve.scheduler import choose_prefix

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
    """Give seq the longest prompt prefix available now (the scheduler's choose_prefix
    decides from what the slots and the cache hold); or a Wait when a sibling that is still
    evaluating its prompt will soon hold a longer one (by at least a cache block)."""
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
    live: list[tuple[int, int]] = []
    evaluating: list[tuple[int, int]] = []
    for slot in engine.batch.siblings(seq):
        live.append((slot.id, min(common_prefix(slot.live(), prompt), limit)))
        other = slot.seq
        if other is not None and other.n_past < other.n_prompt:
            evaluating.append(
                (slot.id, min(common_prefix(other.tokens[: other.n_prompt], prompt), limit)))
    disk = cache.mode == "llama_disk"
    cached = 0 if disk else min(cache.match(view, prompt).tokens, limit)
    choice = choose_prefix(seq.n_past, live, evaluating, cached, cache.block, can_copy=not disk)
    if choice.source == "wait":
        donor = engine.batch.slots[choice.slot].seq
        return Wait(donor, choice.tokens)
    if choice.source == "sibling":
        engine.batch.copy(choice.slot, seq, choice.tokens)
        cache.count_reuse(choice.tokens)
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
