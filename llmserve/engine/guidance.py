"""llguidance on a llama.cpp vocabulary: the tokenizer bridge and compiled grammars (one Guide
per loaded model), and a Gate per constrained sequence that masks its logits.

A Gate's next mask is computed on the Guide's worker thread while llama_decode runs
(`prepare`, called before the decode; both drop the GIL), so sampling only waits for it when
the mask took longer than the decode.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llama_cpp
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from llmserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

COMPILED_KEPT = 16  # grammars kept compiled per model (a client resends the same tools)
# A grammar whose first mask takes more CPU time than this is refused (400): 400 alternatives
# `"a" root?` took llguidance 4-8 s per mask on 2 busy cores; a 250-tool call grammar takes
# ~10 ms. NOTE: CPU time of the computing thread, not wall time, so a loaded machine does
# not turn a good grammar into a (remembered) 400.
MAX_FIRST_MASK_S = 1.0


class Guide:
    """One model's llguidance tokenizer (built once: ~0.3 s for 49k tokens, ~2 s for 262k)
    and its recently compiled grammars."""

    def __init__(self, vocab: Any, n_vocab: int, markers: dict[int, bytes] | None = None):
        t0 = time.perf_counter()
        eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.eog = np.array(eog, dtype=np.intp)
        self.tokenizer = _tokenizer(vocab, n_vocab, eog, markers or {})
        self.n_vocab = n_vocab
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._refused: OrderedDict[str, str] = OrderedDict()  # grammar -> its 400's message
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="llguidance")
        self.compile_s = 0.0  # the last compile's time (benchmarks/structured.py reads it)
        logger.info("llguidance tokenizer for %d tokens in %.2f s", n_vocab,
                    time.perf_counter() - t0)

    def gate(self, grammar: str) -> Gate:
        """A fresh matcher for grammar (compiled once, copied per sequence); 400 if it fails
        to compile or its first mask takes longer than MAX_FIRST_MASK_S."""
        refused = self._refused.get(grammar)
        if refused is not None:
            raise InvalidRequestError(refused, param="grammar", code="invalid_grammar")
        base = self._compiled.get(grammar)
        if base is None:
            t0 = time.perf_counter()
            base = LLMatcher(self.tokenizer, grammar, log_level=0)
            compiled = time.thread_time()
            # NOTE: the first mask (drops the GIL): its cost measured, and a grammar no token
            # can start (`"\x00"`) refused rather than ended at once
            mask = b"" if base.is_error() else base.compute_bitmask()
            first = time.thread_time() - compiled
            self.compile_s = time.perf_counter() - t0
            problem = " ".join(base.get_error().split())[:300] if base.is_error() else ""
            if not problem and not mask.strip(b"\0"):
                problem = "no token can start it"
            if not problem and first > MAX_FIRST_MASK_S:
                problem = (f"its first token mask took {first:.1f} s of CPU (at most "
                           f"{MAX_FIRST_MASK_S} s): too ambiguous")
            if problem:
                message = f"the grammar cannot be enforced: {problem}"
                self._refused[grammar] = message
                while len(self._refused) > COMPILED_KEPT:
                    self._refused.popitem(last=False)
                raise InvalidRequestError(message, param="grammar", code="invalid_grammar")
            self._compiled[grammar] = base
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
            self.compile_s = 0.0
        return Gate(self, base.deep_copy())

    def close(self) -> None:
        """Stop the mask worker."""
        self._worker.shutdown(wait=True)
        self._compiled.clear()


def _tokenizer(vocab: Any, n_vocab: int, eog: list[int],
               markers: dict[int, bytes]) -> LLTokenizer:
    """llguidance.llamacpp.lltokenizer_from_vocab without its deprecated llama.cpp calls:
    each token's bytes (control tokens, and user-defined ones that look like `<...>`, marked
    special with a 0xff prefix), tokenizing through llama.cpp's own function.

    NOTE: markers (single-token `<tool_call>`, `[TOOL_CALLS]`, `<think>`, ... that the output
    side reads as text) stay text, so a grammar's literal "<tool_call>" allows the model's
    own token, as llama.cpp's grammars did."""
    buf = ctypes.create_string_buffer(16 * 1024)
    tokens: list[bytes] = []
    special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    user = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    for token in range(n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf) - 1, 0, True)
        piece = buf.raw[: max(n, 0)]
        if token in markers:
            tokens.append(markers[token])
            continue
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & special or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    made: LLTokenizer = LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize,
        eos_token=eog or llama_cpp.llama_vocab_eos(vocab), slices=None)
    return made


class Gate:
    """One sequence's matcher: prepare() starts the next mask, apply() sets every token it
    disallows to -inf in the logits, accept() advances past the sampled token."""

    def __init__(self, guide: Guide, matcher: LLMatcher):
        self._guide = guide
        self.matcher = matcher
        self._bits = np.zeros((guide.n_vocab + 31) // 32, dtype=np.int32)
        self._pending: Future[None] | None = None
        self._keep: Any = None  # token ids to keep (the rest masked), or
        self._drop: Any = None  # token ids to mask (None and None: all allowed)

    def _fill(self) -> None:
        """The next mask, and which side of it to write: the allowed ids when they are few
        (JSON: most tokens masked), the disallowed ones when those are (free text)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        n = self._guide.n_vocab
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:n]
        allowed = np.flatnonzero(bits)
        if allowed.size == 0:
            # NOTE: a matcher in an error state allows nothing: end the choice rather than
            # sample from an all -inf row.
            logger.warning("grammar matcher stuck: %s", self.matcher.get_error()[:200])
            self._keep, self._drop = self._guide.eog, None
        elif allowed.size == n:
            self._keep, self._drop = None, None
        elif allowed.size <= n // 2:
            self._keep, self._drop = allowed, None
        else:
            self._keep, self._drop = None, np.flatnonzero(bits == 0)

    def prepare(self) -> None:
        """Compute the next mask on the worker thread (idempotent until apply)."""
        if self._pending is None:
            self._pending = self._guide._worker.submit(self._fill)

    def _ready(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        else:
            self._fill()

    def apply(self, logits: Any) -> None:
        """Set the logits of every token the grammar disallows next to -inf, in place (a
        llama.cpp buffer or an array)."""
        self._ready()
        row = logits if isinstance(logits, np.ndarray) else \
            np.ctypeslib.as_array(logits, shape=(self._guide.n_vocab,))
        # NOTE: the cheap side of the mask: this runs on the engine thread between decodes
        if self._keep is not None:
            kept = row[self._keep]
            row.fill(-np.inf)
            row[self._keep] = kept
        elif self._drop is not None:
            row[self._drop] = -np.inf

    def accept(self, token: int) -> None:
        """Advance past token (sampled under this gate's mask)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if not self.matcher.consume_token(token):
            logger.warning("grammar rejected token %d: %s", token,
                           self.matcher.get_error()[:200])

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of tokens (a draft) the grammar would take in order from here; the
        matcher's state is unchanged."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return int(self.matcher.validate_tokens(tokens))

    def close(self) -> None:
        """Wait for a mask still being computed (the matcher must outlive it)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
