"""A llama_sampler chain per sequence, and GBNF grammars checked the way llama.cpp's common
sampler checks them: sample first, test the chosen token, mask and resample on rejection."""

from __future__ import annotations

import ctypes
import random
from typing import Any

import llama_cpp
import numpy as np

from llmserve.engine.base import SamplingParams
from llmserve.errors import InvalidRequestError

# llama-cpp-python's Llama keeps the last 64 tokens for its penalties; so do we.
PENALTY_LAST_N = 64


class GrammarGate:
    """A GBNF grammar sampler used as a gate: allows(token), mask(logits), accept(token)."""

    def __init__(self, vocab: Any, text: str):
        # NOTE: a grammar llama.cpp cannot parse comes back NULL (and would crash the first
        # sample). chat/gbnf.py rejects those first; this check is the last line of defence.
        self._smpl = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not self._smpl:
            raise InvalidRequestError("llama.cpp could not parse the grammar", param="grammar",
                                      code="invalid_grammar")
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one, size=1, selected=-1, sorted=False
        )

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts token next."""
        entry: Any = self._one[0]
        entry.id, entry.logit, entry.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._one_array))
        return bool(np.isfinite(entry.logit))

    def mask(self, cands: _Candidates) -> None:
        """Drop every candidate the grammar rejects (their logits become -inf)."""
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(cands.array))

    def accept(self, token: int) -> None:
        """Advance the grammar past token."""
        llama_cpp.llama_sampler_accept(self._smpl, token)

    def close(self) -> None:
        """Free the grammar sampler."""
        if self._smpl:
            llama_cpp.llama_sampler_free(self._smpl)
            self._smpl = None


class _Candidates:
    """A reusable llama_token_data_array over the whole vocabulary."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.data = np.zeros(
            n_vocab, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                    align=True),
        )
        self.ids = np.arange(n_vocab, dtype=np.intc)
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab,
            selected=-1, sorted=False,
        )

    def load(self, logits: Any) -> None:
        self.data["id"] = self.ids
        self.data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self.data["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = self.n_vocab, -1, False

    def selected(self) -> int:
        return int(self.data["id"][self.array.selected])


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

    def __init__(self, params: SamplingParams, n_vocab: int, gate: GrammarGate | None):
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        self._gate = gate
        self._n_vocab = n_vocab
        self._cands: _Candidates | None = None
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

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from the logits at batch index idx (accepted into the chain)."""
        if self._gate is None:
            # NOTE: llama_sampler_sample accepts the token into the chain itself.
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, idx))
        gate = self._gate
        if self._cands is None:
            self._cands = _Candidates(self._n_vocab)
        cands = self._cands
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        cands.load(logits)
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(cands.array))
        token = cands.selected()
        if not gate.allows(token):
            cands.load(logits)
            gate.mask(cands)
            llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(cands.array))
            token = cands.selected()
        llama_cpp.llama_sampler_accept(self._chain, token)
        gate.accept(token)
        return token

    def close(self) -> None:
        """Free the chain (it owns its samplers) and the grammar."""
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
