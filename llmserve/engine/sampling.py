"""A llama_sampler chain per sequence; a grammar's gate (engine/guidance.py) masks the logits
before the chain samples."""

from __future__ import annotations

import random
from typing import Any

import llama_cpp

from llmserve.engine.base import SamplingParams
from llmserve.engine.guidance import Gate
from llmserve.errors import InvalidRequestError

# llama-cpp-python's Llama keeps the last 64 tokens for its penalties; so do we.
PENALTY_LAST_N = 64


def _logit_bias(n_vocab: int, bias: tuple[tuple[int, float], ...]) -> Any:
    """llama.cpp's logit-bias sampler: adds each bias to its token's logit."""
    # NOTE: llama.cpp indexes the logits by token id without a bounds check when it sees the
    # whole vocabulary; the service rejects ids outside it first, this is the last guard.
    if any(not 0 <= token < n_vocab for token, _ in bias):
        raise InvalidRequestError("logit_bias names a token outside the vocabulary",
                                  param="logit_bias")
    entries = (llama_cpp.llama_logit_bias * len(bias))()
    for entry, (token, value) in zip(entries, bias, strict=True):
        entry.token, entry.bias = token, value
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), entries)


class SeqSampler:
    """One sequence's sampler chain (logit bias, penalties, top-k/p, min-p, temperature,
    seeded dist); a -100 bias is additive like OpenAI's, so a grammar can still force it."""

    def __init__(self, params: SamplingParams, n_vocab: int, gate: Gate | None):
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        self._gate = gate
        chain = self._chain

        def add(smpl: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, smpl)

        p = params
        if p.logit_bias:
            add(_logit_bias(n_vocab, p.logit_bias))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty,
                p.presence_penalty))
        if p.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        seed = p.seed if p.seed is not None else random.randrange(2**31)
        if p.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(p.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))

    def prepare(self) -> None:
        """Start the grammar's next mask (on its worker thread, while llama_decode runs)."""
        if self._gate is not None:
            self._gate.prepare()

    def check_draft(self, draft: list[int]) -> list[int]:
        """The prefix of a draft the grammar allows (all of it without a grammar)."""
        if self._gate is None or not draft:
            return draft
        return draft[: self._gate.valid_prefix(draft)]

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from the logits at batch index idx (accepted into the chain); a
        grammar first sets the logits of the tokens it disallows to -inf, in place."""
        if self._gate is not None:
            self._gate.apply(llama_cpp.llama_get_logits_ith(ctx, idx))
        # NOTE: llama_sampler_sample accepts the token into the chain itself.
        token = int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))
        if self._gate is not None:
            self._gate.accept(token)
        return token

    def close(self) -> None:
        """Free the chain (it owns its samplers) and the grammar."""
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
