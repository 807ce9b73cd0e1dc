"""LlamaDraftModel: a smaller GGUF with the target's vocabulary drafting greedily for every
sequence of the target (engine/drafting.py DraftModel; llama-server's -md).

It has a llama_context of its own with one sequence per target slot (the same slot ids), so a
sequence's draft KV goes on from where its last draft left it: each propose() first syncs
every slot with the tokens the target holds now (keeps the common prefix, drops what the
target rejected, evaluates what it lacks, all slots batched together), then drafts one token
per still-drafting sequence per llama_decode.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._utils import suppress_stdout_stderr

from llmserve.config import Settings
from llmserve.engine.base import common_prefix
from llmserve.engine.kvtypes import captured_llama_log, context_types
from llmserve.engine.weights import load_weights
from llmserve.errors import ModelLoadError
from llmserve.hardware import machine_threads

logger = logging.getLogger(__name__)

# NOTE: a sequence's draft stops before a token the draft model gives less than this
# probability (llama-server's --draft-p-min, whose default is 0.75 too). On a CPU the target
# verifies a draft in compute-bound time, so every drafted token costs about what it would
# cost to decode it alone plus the draft model's own step; a guess the draft model itself
# doubts is rejected more often than it pays for. A lower cutoff (0.3) drafts more and wastes
# more; a GPU, where verifying is nearly free, could afford one.
DRAFT_P_MIN = 0.75

# (slot, position, token, logits wanted)
_Entry = tuple[int, int, int, bool]


class _NoRoom(Exception):
    """The draft context's KV cache has no room left (or a decode failed otherwise)."""


def vocab_digest(vocab: Any) -> str:
    """A hash of every token's text in a vocabulary (llama_vocab_p), in id order."""
    h = hashlib.blake2b(digest_size=16)
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        text = llama_cpp.llama_vocab_get_text(vocab, token)
        h.update(len(text).to_bytes(4, "little"))
        h.update(text)
    return h.hexdigest()


def load_draft_model(path: Path, settings: Settings, target: Any, target_name: str,
                     n_ctx: int, n_parallel: int) -> LlamaDraftModel:
    """Load path as the draft model of target (its _internals.LlamaModel, named target_name)
    with a context of n_ctx cells and n_parallel sequences; ModelLoadError when it cannot load
    or its vocabulary differs from the target's."""
    verbose = settings.log_level == "debug"
    model = load_weights(path, settings.n_gpu_layers, verbose=verbose, what="the draft model")
    try:
        n_draft, n_target = int(model.n_vocab()), int(target.n_vocab())
        if n_draft != n_target:
            why = f"{n_draft} tokens vs {n_target}"
        elif vocab_digest(model.vocab) != vocab_digest(target.vocab):
            why = "the same number of tokens, other token texts"
        else:
            why = ""
        if why:
            raise ModelLoadError(f"draft model {path.name} cannot draft for {target_name}: "
                                 f"its vocab differs ({why})")
        threads = settings.n_threads or machine_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = settings.n_batch
        ctx_params.n_seq_max = n_parallel
        # NOTE: as the target's (engine/batch.py): one pool of cells for every sequence, and a
        # full-size sliding-window cache so that any prefix can be kept when a draft is trimmed
        ctx_params.kv_unified = True
        ctx_params.swa_full = True
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = settings.n_threads_batch or threads
        # NOTE: f16 whatever --cache_type_k/v say: the draft cache is small and never saved
        ctx_params.type_k, ctx_params.type_v, ctx_params.flash_attn_type = context_types(
            "f16", "f16", settings.flash_attn)
        with suppress_stdout_stderr(disable=verbose), captured_llama_log(verbose) as log:
            ctx = llama_cpp.llama_init_from_model(model.model, ctx_params)
        if not ctx:
            raise ModelLoadError(f"cannot create a context for the draft model {path.name} "
                                 f"({log.errors() or 'no reason logged'})")
    except BaseException:
        model.close()  # type: ignore[no-untyped-call]
        raise
    logger.info("draft model %s for %s (n_ctx %d, %d sequences)", path.name, target_name,
                n_ctx, n_parallel)
    return LlamaDraftModel(path.name, model, ctx, n_ctx=int(llama_cpp.llama_n_ctx(ctx)),
                           n_batch=settings.n_batch, n_parallel=n_parallel)


class LlamaDraftModel:
    """A draft model and its context: one sequence per target slot (DraftModel)."""

    def __init__(self, name: str, model: _internals.LlamaModel, ctx: Any, *, n_ctx: int,
                 n_batch: int, n_parallel: int):
        self.name = name
        self.p_min = DRAFT_P_MIN  # NOTE: an attribute so that tests can draft without it
        self._model = model
        self._vocab = model.vocab
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = int(model.n_vocab())
        self._batch: Any = llama_cpp.llama_batch_init(max(n_batch, n_parallel), 0, 1)
        self._held: list[list[int]] = [[] for _ in range(n_parallel)]  # KV per slot
        self._proposing: set[int] = set()  # the slots of the propose() call running
        self.decodes = 0  # llama_decode calls, since loaded
        self.evaluated = 0  # tokens decoded, since loaded

    def held(self, slot: int) -> list[int]:
        """The tokens whose KV slot holds in the draft context."""
        return list(self._held[slot])

    def propose(self, items: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (slot, tokens, k): up to k tokens the draft model would produce after
        tokens, greedily (stopping after an end-of-generation token or before one it gives
        less than p_min). Empty drafts, never an exception, when its KV has no room."""
        out: list[list[int]] = [[] for _ in items]
        todo: list[tuple[int, int, list[int], int]] = []  # (item index, slot, tokens, k)
        for i, (slot, tokens, k) in enumerate(items):
            k = min(k, self.n_ctx - len(tokens))
            if k > 0 and tokens and 0 <= slot < len(self._held):
                todo.append((i, slot, tokens, k))
        if not todo:
            return out
        self._proposing = {slot for _, slot, _, _ in todo}
        try:
            first = self._sync([(slot, tokens) for _, slot, tokens, _ in todo])
            self._draft(todo, first, out)
        except _NoRoom as exc:
            # NOTE: a draft is only a guess: the sequences go on without one
            logger.warning("draft model %s: %s; its KV cache is cleared", self.name, exc)
            self.clear()
            return [[] for _ in items]
        return out

    def _sync(self, seqs: list[tuple[int, list[int]]]) -> list[tuple[int, float]]:
        """Make each slot's KV hold all of its tokens but the last, then evaluate the last
        ones; each sequence's best next token and its probability."""
        entries: list[_Entry] = []
        for slot, tokens in seqs:
            held = self._held[slot]
            n = len(held) if tokens[: len(held)] == held else common_prefix(held, tokens)
            # NOTE: the last token is evaluated again when held: its logits are gone
            n = min(n, len(tokens) - 1)
            if n < len(held) and not llama_cpp.llama_memory_seq_rm(self._mem, slot, n, -1):
                llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
                n = 0
            del held[n:]
            entries += [(slot, pos, tokens[pos], pos == len(tokens) - 1)
                        for pos in range(n, len(tokens))]
        return self._evaluate(entries)

    def _draft(self, todo: list[tuple[int, int, list[int], int]],
               first: list[tuple[int, float]], out: list[list[int]]) -> None:
        """Greedy drafts from each sequence's first best token: one decode per position."""
        live: list[tuple[int, int, int]] = []  # (item index, slot, k) still drafting
        for (i, slot, _tokens, k), (token, p) in zip(todo, first, strict=True):
            if p >= self.p_min:
                out[i].append(token)
                if len(out[i]) < k and not self._is_eog(token):
                    live.append((i, slot, k))
        while live:
            entries: list[_Entry] = []
            for i, slot, _k in live:
                entries.append((slot, len(self._held[slot]), out[i][-1], True))
            best = self._evaluate(entries)
            still: list[tuple[int, int, int]] = []
            for (i, slot, k), (token, p) in zip(live, best, strict=True):
                if p < self.p_min:
                    continue
                out[i].append(token)
                if len(out[i]) < k and not self._is_eog(token):
                    still.append((i, slot, k))
            live = still

    def _evaluate(self, entries: list[_Entry]) -> list[tuple[int, float]]:
        """Decode entries in order (n_batch per llama_decode); the best token and its
        probability at each entry that wants logits, in order."""
        best: list[tuple[int, float]] = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            b = self._batch
            for j, (slot, pos, token, logits) in enumerate(chunk):
                b.token[j] = token
                b.pos[j] = pos
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = slot
                b.logits[j] = int(logits)
            b.n_tokens = len(chunk)
            rc = int(llama_cpp.llama_decode(self._ctx, b))
            if rc == 1 and self._drop_others(self._proposing):
                # NOTE: n_ubatch = n_batch: the failed decode left nothing in the cache
                rc = int(llama_cpp.llama_decode(self._ctx, b))
            if rc != 0:
                raise _NoRoom(f"llama_decode failed ({rc}) on {len(chunk)} tokens")
            self.decodes += 1
            self.evaluated += len(chunk)
            for j, (slot, _pos, token, logits) in enumerate(chunk):
                self._held[slot].append(token)
                if logits:
                    best.append(self._best(j))
        return best

    def _best(self, idx: int) -> tuple[int, float]:
        """The argmax of the logits at batch index idx and its softmax probability."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, idx),
                                       shape=(self.n_vocab,))
        token = int(np.argmax(logits))
        peak = float(logits[token])
        return token, float(1.0 / np.exp(logits.astype(np.float64) - peak).sum())

    def _drop_others(self, keep: set[int]) -> bool:
        """Free the KV of every slot not in keep; whether any held some."""
        dropped = False
        for slot, held in enumerate(self._held):
            if slot not in keep and held:
                llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
                held.clear()
                dropped = True
        return dropped

    def _is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def clear(self) -> None:
        """Forget every slot's draft KV."""
        llama_cpp.llama_memory_clear(self._mem, True)
        for held in self._held:
            held.clear()

    def close(self) -> None:
        """Free the batch, the context and the model."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._model.close()  # type: ignore[no-untyped-call]
            self._model = None  # type: ignore[assignment]
