"""BatchContext: one llama_context holding up to n_parallel sequences, advanced together.

NOTE: the KV cache is unified (llama.cpp's kv_unified, llama-server's --kv-unified): the
n_ctx cells are one pool shared by every sequence, and llama_memory_seq_cp makes a prefix live
in two sequences without a second copy of its cells, so an agent system prompt shared by four
conversations costs its cells once. Any one sequence may use up to n_ctx tokens.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from llmserve.engine.base import KVFullError, Seq, StepPlan, common_prefix
from llmserve.engine.kvtypes import captured_llama_log, context_types
from llmserve.errors import InternalError

logger = logging.getLogger(__name__)

# NOTE: a slot whose next sequence keeps all but this many of its tokens is the same
# conversation going on; its unsaved KV is superseded by that sequence's, not stored first.
SUPERSEDED = 256


@dataclass
class _Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens in this slot's KV while idle
    seq: Seq | None = None
    last_used: float = 0.0
    dirty: bool = False  # its idle KV is not in the prompt cache tiers yet
    n_prompt: int = 0  # of the sequence that left that KV
    partition: str = ""  # the prompt-cache partition of that KV (llmserve/tenancy.py)

    def live(self) -> list[int]:
        """Tokens whose KV this slot holds now."""
        return self.seq.tokens[: self.seq.n_past] if self.seq is not None else self.cached


class BatchContext:
    """The context, its batch and its slots (sequence ids 0 .. n_parallel-1)."""

    def __init__(self, model: Any, *, n_ctx: int, n_batch: int, n_parallel: int,
                 n_threads: int, n_threads_batch: int, swa_full: bool,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", flash_attn: str = "auto",
                 verbose: bool = False):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_parallel
        params.kv_unified = True
        params.swa_full = swa_full
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        # NOTE: ModelLoadError for a combination llama.cpp refuses (quantized V, no flash attn)
        params.type_k, params.type_v, params.flash_attn_type = context_types(
            cache_type_k, cache_type_v, flash_attn)
        self.params = params
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        with captured_llama_log(verbose) as log:
            self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            why = log.errors() or "no reason logged"
            raise ValueError(f"llama.cpp could not create a context ({why})")
        # what llama.cpp chose for --flash_attn auto (the request when it did not say), and the
        # KV buffer it allocated (None when it did not say)
        self.flash_attn = log.flash_attn() or flash_attn
        self.kv_bytes = log.kv_bytes()
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = n_batch
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self._batch = llama_cpp.llama_batch_init(max(n_batch, n_parallel), 0, 1)
        self.steps = 0
        self.last_batch_tokens = 0
        self.decode_seconds = 0.0  # inside llama_decode, since the context was made
        self._draft_log: list[tuple[str, int, int]] = []  # (source, drafted, accepted)
        # NOTE: set by the server (sharing.save_slot): stores an idle slot's KV in the prompt
        # cache tiers (slot id, its tokens, its prompt length, its partition) before that KV
        # is dropped.
        self.evict_hook: Callable[[int, list[int], int, str], None] | None = None

    # -- slots -------------------------------------------------------------------------------

    def acquire(self, prompt: list[int], partition: str = "") -> _Slot | None:
        """A free slot, preferring the one whose KV (of the same partition) shares most with
        prompt, then the LRU."""
        free = [s for s in self.slots if s.seq is None]
        if not free:
            return None
        # NOTE: among slots sharing nothing, one whose KV is already stored costs no save
        return max(free, key=lambda s: (self._shared(s, prompt, partition), not s.dirty,
                                        -s.last_used))

    @staticmethod
    def _shared(slot: _Slot, prompt: list[int], partition: str) -> int:
        """Tokens of prompt whose KV the idle slot holds for this partition."""
        return common_prefix(slot.cached, prompt) if slot.partition == partition else 0

    def bind(self, slot: _Slot, seq: Seq) -> None:
        """Give slot to seq, keeping the KV of the prefix they share (none of another
        partition's)."""
        keep = min(self._shared(slot, seq.tokens, seq.partition), seq.keep_limit())
        if keep + SUPERSEDED < len(slot.cached):
            self._store(slot)  # another conversation takes the slot: keep this one's KV
        slot.dirty = False  # (or the same one goes on: its next state supersedes this one)
        self.trim(slot.id, keep)
        slot.seq, slot.cached, slot.partition = seq, [], seq.partition
        seq.n_past = seq.reused = keep

    def release(self, seq: Seq) -> None:
        """The slot of seq becomes free; its KV stays for a later prompt (and is stored in
        the prompt cache tiers later when seq.cache_on_close)."""
        slot = self.slots[seq.slot]
        slot.cached = seq.tokens[: seq.n_past]
        slot.seq = None
        slot.last_used = time.monotonic()
        slot.dirty = seq.cache_on_close and bool(slot.cached)
        slot.n_prompt = seq.n_prompt

    def _store(self, slot: _Slot) -> None:
        if slot.dirty and slot.seq is None and self.evict_hook is not None:
            slot.dirty = False
            try:
                self.evict_hook(slot.id, list(slot.cached), slot.n_prompt, slot.partition)
            except Exception:  # NOTE: a failed save loses a cache entry, nothing else
                logger.exception("storing slot %d in the prompt cache failed", slot.id)

    def flush_one(self) -> bool:
        """Store one idle slot's KV that the prompt cache tiers lack; False: none left."""
        for slot in sorted(self.slots, key=lambda s: s.last_used):
            if slot.dirty and slot.seq is None:
                self._store(slot)
                return True
        return False

    def siblings(self, seq: Seq) -> list[_Slot]:
        """Every other slot whose KV seq may share: of the same partition."""
        return [s for s in self.slots if s.id != seq.slot and s.partition == seq.partition]

    # -- KV operations -----------------------------------------------------------------------

    def trim(self, slot: int, n: int) -> None:
        """Keep the KV of the first n positions of slot only."""
        llama_cpp.llama_memory_seq_rm(self.mem, slot, n, -1)
        s = self.slots[slot]
        if s.seq is None:
            s.cached = s.cached[:n]

    def copy(self, src: int, seq: Seq, n: int) -> None:
        """Make seq hold the first n positions of slot src (shared cells, no copy)."""
        llama_cpp.llama_memory_seq_rm(self.mem, seq.slot, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, src, seq.slot, 0, n)
        seq.n_past = seq.reused = n

    def get_state(self, slot: int, window_only: bool) -> bytes:
        """The KV state of one sequence (llama_state_seq_get_data layout)."""
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if window_only else 0
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, slot, flags)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf, size, slot, flags)
        return bytes(memoryview(buf)[:written])

    def set_state(self, slot: int, blob: bytes | bytearray) -> bool:
        """Load a sequence state into slot; False (slot emptied) if llama.cpp refuses it."""
        buf: Any
        if isinstance(blob, bytearray):  # NOTE: llama.cpp only reads it: no copy
            buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        else:
            buf = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
        ok = llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, len(blob), slot, 0) == len(blob)
        if not ok and self.drop_idle():  # NOTE: a restore needs free cells, as a decode does
            ok = llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, len(blob), slot,
                                                        0) == len(blob)
        if not ok:
            self.trim(slot, 0)
        return bool(ok)

    def drop_idle(self) -> int:
        """Free the KV of every idle slot; returns how many held any."""
        n = 0
        for s in self.slots:
            if s.seq is None and s.cached:
                self._store(s)
                self.trim(s.id, 0)
                n += 1
        return n

    def clear(self) -> None:
        """Forget every idle slot's KV."""
        for s in self.slots:
            if s.seq is None:
                self._store(s)
                self.trim(s.id, 0)

    # -- decoding ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan, is_eog: Callable[[int], bool] = lambda t: False,
                ) -> list[tuple[Seq, int]]:
        """One llama_decode over the plan's tokens; sample each sequence whose tokens are
        all in. The plan (the scheduler's) says which tokens and in what order; a sequence's
        draft is verified in the same decode: the tokens sampled are exactly those sampling
        one token per step would give, and the KV keeps the draft's accepted prefix only."""
        items = list(plan.items)
        if not items:
            return []
        if plan.n_tokens > self.n_batch or any(n < 1 or n > s.pending for s, n in items):
            raise InternalError(f"a step plan this context cannot take ({plan.n_tokens} "
                                f"tokens, n_batch {self.n_batch})")
        drafts = {id(seq): list(d) for seq, d in plan.drafts if d}
        for seq, n in items:
            if n == seq.pending and not seq.prefill_only:
                # NOTE: a grammar's mask for this step is computed while llama_decode runs
                seq.handle.prepare()
        rc = self._decode(items, drafts)
        if rc == 1 and drafts:  # NOTE: room for the step's own tokens comes before drafts
            drafts = {}
            rc = self._decode(items, drafts)
        if rc == 1 and self.drop_idle():
            rc = self._decode(items, drafts)
        if rc == 1:
            raise KVFullError(f"no room in the KV cache for {plan.n_tokens} tokens")
        if rc != 0:
            raise InternalError(f"llama_decode failed ({rc})")
        self.steps += 1
        out: list[tuple[Seq, int]] = []
        idx = 0
        for seq, n in items:
            idx += n
            seq.n_past += n
            if seq.pending == 0 and not seq.prefill_only:
                draft = drafts.get(id(seq), [])
                idx += self._verify(seq, idx - 1, draft, is_eog, out)
        return out

    def _verify(self, seq: Seq, idx: int, draft: list[int], is_eog: Callable[[int], bool],
                out: list[tuple[Seq, int]]) -> int:
        """Sample seq's next token from the logits at batch index idx; while it equals the
        draft's next token, the draft token's KV is kept and the token after it is sampled
        from that token's logits (idx + 1, ...). Returns the draft's length (its batch rows).

        NOTE: each token is sampled once, in order, from the logits one-at-a-time decoding
        would give it (the sampler chain, penalties, grammar and seed advance the same way),
        so greedy output is unchanged and sampled output keeps its distribution: accepting a
        drafted token exactly when the sampler picks it is the standard rule for a draft
        that proposes one token per position."""
        top = seq.params.logprobs
        accepted = 0
        for j in range(len(draft) + 1):
            if j:
                seq.handle.prepare()  # NOTE: the grammar's mask after the accepted token
            # NOTE: log-probabilities of the raw logits: read before a grammar masks them
            raw = self._raw_logprobs(idx + j) if top is not None else None
            token = seq.handle.sample(self.ctx, idx + j)
            if raw is not None and top is not None:
                seq.logprobs.append(self._logprobs(raw, token, top))
            seq.tokens.append(token)
            out.append((seq, token))
            if j == len(draft) or token != draft[j] or \
                    (is_eog(token) and not seq.params.ignore_eos):
                break
            accepted += 1
        if draft:
            seq.n_past += accepted
            if accepted < len(draft):  # NOTE: the rejected tail leaves the KV
                llama_cpp.llama_memory_seq_rm(self.mem, seq.slot, seq.n_past, -1)
            drafter = seq.drafter
            seq.drafted += len(draft)
            seq.accepted += accepted
            source = drafter.source if drafter is not None else ""
            if drafter is not None:
                drafter.verified(len(draft), accepted)
            if source == "prediction":
                seq.predicted += len(draft)
                seq.predicted_accepted += accepted
            self._draft_log.append((source or "other", len(draft), accepted))
        return len(draft)

    def take_draft_log(self) -> list[tuple[str, int, int]]:
        """(source, drafted, accepted) of each draft verified since the last call."""
        log, self._draft_log = self._draft_log, []
        return log

    def _raw_logprobs(self, idx: int) -> Any:
        """The model's raw logits at batch index idx as log-probabilities (before temperature,
        penalties or grammar, as llama-server reports them)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, idx),
                                       shape=(self.n_vocab,)).astype(np.float64)
        peak = logits.max()
        return logits - (peak + np.log(np.exp(logits - peak).sum()))

    def _logprobs(self, logits: Any, token: int,
                  top: int) -> tuple[float, list[tuple[int, float]]]:
        """token's log-probability and the top ones, from _raw_logprobs."""
        best: list[tuple[int, float]] = []
        if top > 0:
            ids = np.argpartition(-logits, top - 1)[:top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [(int(i), float(logits[i])) for i in ids]
        return float(logits[token]), best

    def _decode(self, plan: list[tuple[Seq, int]], drafts: dict[int, list[int]]) -> int:
        b = self._batch
        i = 0
        for seq, n in plan:
            start = seq.n_past
            tokens = seq.tokens
            last = start + n == len(tokens) and not seq.prefill_only
            draft = drafts.get(id(seq), []) if last else []
            for pos in range(start, start + n):
                b.token[i] = tokens[pos]
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq.slot
                b.logits[i] = 0
                i += 1
            if last:
                b.logits[i - 1] = 1
            for j, token in enumerate(draft):  # NOTE: each draft token's logits are verified
                b.token[i] = token
                b.pos[i] = start + n + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq.slot
                b.logits[i] = 1
                i += 1
        b.n_tokens = i
        self.last_batch_tokens = i
        t0 = time.perf_counter()
        try:
            return int(llama_cpp.llama_decode(self.ctx, b))
        finally:
            self.decode_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Free the batch and the context."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
