"""LlamaEngine: a GGUF model and its batched context (the engine package owns llama_cpp)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import _logger as llama_logger
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama import LlamaState
from llama_cpp.llama_cache import LlamaDiskCache

from llmserve.config import Settings
from llmserve.engine.base import (
    KVFullError,
    ModelInfo,
    SamplingParams,
    Seq,
    StepPlan,
    common_prefix,
)
from llmserve.engine.batch import BatchContext
from llmserve.engine.chunking import Cutter
from llmserve.engine.draft_model import load_draft_model
from llmserve.engine.drafting import DraftModel, SeqDrafter, SourceRates
from llmserve.engine.guidance import Gate, Guide
from llmserve.engine.kvtypes import context_types
from llmserve.engine.sampling import SeqSampler
from llmserve.engine.vocab import scan_vocab
from llmserve.engine.weights import load_weights
from llmserve.errors import ContextLengthError, InternalError, ModelLoadError
from llmserve.hardware import machine_threads
from llmserve.tenancy import salted

logger = logging.getLogger(__name__)

# Control tokens that mark tool calls: rendered as text so the tool-call parsers see them
# (other control tokens render empty).
TOOL_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]",
                "<|python_tag|>")
# Reasoning markup (llmserve/chat/reasoning.py), rendered as text for the same reason; gpt-oss's
# channel tokens only in vocabularies that have them (`<|end|>` means other things elsewhere).
THINK_MARKERS = ("<think>", "</think>")
HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|constrain|>")
_backend_ready = False
# NOTE: an embedding context reserves compute for n_ubatch = n_ctx tokens, which grows with
# the square of n_ctx (1.7 GiB at 8192 for SmolLM2-135M); it starts this small and grows
# (powers of two, up to the chat n_ctx) when a longer input arrives.
EMBED_MIN_CTX = 512
# NOTE: a chat model's embedding is our own mean over per-token outputs, evaluated in chunks
# of this many tokens (causal attention carries across chunks in the context's KV), each
# chunk one call between decode steps (~0.4 s for SmolLM2 on 2 CPU cores). The size is fixed:
# the same input always gives the same vector.
EMBED_CHUNK = 64


def _fingerprint(path: Path, params: Any) -> str:
    """Identifies the weights and KV layout: a cache entry never restores into another model."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(1 << 22))
        f.seek(max(0, size - (1 << 22)))
        h.update(f.read(1 << 22))
    h.update(
        f"{size}|{llama_cpp.__version__}|{params.type_k}|{params.type_v}|"
        f"{params.flash_attn_type}|{params.swa_full}".encode()
    )
    return h.hexdigest()


class LlamaEngine:
    """A GGUF model loaded in-process, with one batched context of n_parallel sequences."""

    def __init__(self, model: _internals.LlamaModel, batch: BatchContext, path: Path,
                 settings: Settings):
        self._model = model
        self.batch = batch
        self.n_parallel = len(batch.slots)
        self.n_batch = batch.n_batch
        self.fingerprint = _fingerprint(path, batch.params)
        self._verbose = settings.log_level == "debug"
        self._disk_caches: dict[str, LlamaDiskCache] = {}  # by prompt-cache partition
        self._embedder: _Embedder | None = None
        self._vocab = model.vocab
        self._guide: Guide | None = None  # llguidance, built at the first grammar
        # speculative decoding (engine/drafting.py)
        self.draft = settings.draft
        self.draft_max = settings.draft_max
        self.draft_min = settings.draft_min
        self.draft_model: DraftModel | None = None
        self.draft_rates = SourceRates()  # each draft source's acceptance on this model
        self._piece_cache: dict[int, bytes] = {}
        meta = model.metadata()
        vocab = scan_vocab(self._vocab, model.n_vocab())
        self._control_ids = vocab.control_ids
        # NOTE: cutting long texts before special tokens keeps tokenizing linear (chunking.py)
        self._cutters = {
            True: Cutter(self._special_text(t) for t in (*vocab.control_ids, *vocab.user_ids)),
            False: Cutter(self._special_text(t) for t in vocab.user_ids),
        } if not vocab.strips else None
        bos_id = model.token_bos()
        eos_id = model.token_eos()
        self.info = ModelInfo(
            name=path.name,
            path=str(path),
            n_ctx=batch.n_ctx,
            architecture=meta.get("general.architecture", ""),
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=self._special_text(bos_id),
            eos_token=self._special_text(eos_id),
            add_bos=bool(model.add_bos_token()),
            bos_token_id=bos_id if bos_id >= 0 else None,
            n_vocab=model.n_vocab(),
            n_embd=model.n_embd(),
            metadata=meta,
            control_tokens=tuple(self._special_text(t) for t in vocab.control_ids),
            max_token_bytes=vocab.max_text_bytes,
            cache_type_k=batch.cache_type_k,
            cache_type_v=batch.cache_type_v,
            flash_attn=batch.flash_attn,
            kv_bytes=batch.kv_bytes,
        )
        self._markers = self._marker_tokens()

    @classmethod
    def load(cls, path: Path, settings: Settings) -> LlamaEngine:
        """Load a GGUF file with the server's settings."""
        global _backend_ready
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        verbose = settings.log_level == "debug"
        # NOTE: llama.cpp logs through llama-cpp-python's logger; quiet unless debugging
        # (Llama(verbose=False) did this before; the batch loop would print every restore).
        llama_logger.set_verbose(verbose)
        try:
            context_types(settings.cache_type_k, settings.cache_type_v, settings.flash_attn)
        except ModelLoadError as exc:  # NOTE: before the weights are read
            raise ModelLoadError(f"cannot load {path.name}: {exc.message}") from None
        model = load_weights(path, settings.n_gpu_layers, verbose=verbose)
        # NOTE: ModelManager decides n_ctx and threads (catalog/context.py) and logs why;
        # these fallbacks serve direct loads (tests, benchmarks).
        threads = settings.n_threads or machine_threads()
        try:
            with suppress_stdout_stderr(disable=verbose):
                batch = BatchContext(
                    model.model, n_ctx=settings.n_ctx or model.n_ctx_train(),
                    n_batch=settings.n_batch, n_parallel=settings.parallel,
                    n_threads=threads, n_threads_batch=settings.n_threads_batch or threads,
                    # NOTE: a full-size sliding-window cache keeps every position, so any
                    # prefix of a Gemma 3 sequence can be kept, copied or restored.
                    swa_full=True,
                    cache_type_k=settings.cache_type_k, cache_type_v=settings.cache_type_v,
                    flash_attn=settings.flash_attn, verbose=verbose,
                )
        except ValueError as exc:
            model.close()  # type: ignore[no-untyped-call]
            raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
        engine = cls(model, batch, path, settings)
        if settings.draft_model:
            try:
                engine.draft_model = load_draft_model(
                    Path(settings.draft_model), settings, model, path.name, batch.n_ctx,
                    len(batch.slots))
            except BaseException:
                engine.close()
                raise
        return engine

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        size = 64
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
        if n < 0:  # NOTE: a negative result is the buffer size the piece needs
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
        return buf.raw[: max(n, 0)]

    def control_token_ids(self) -> list[int]:
        """Ids of the control (and unknown) tokens: what client text must never produce."""
        return list(self._control_ids)

    def _marker_tokens(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        harmony = len(self.tokenize(HARMONY_MARKERS[0], add_special=False,
                                    parse_special=True)) == 1
        for marker in (*TOOL_MARKERS, *THINK_MARKERS, *(HARMONY_MARKERS if harmony else ())):
            tokens = self.tokenize(marker, add_special=False, parse_special=True)
            if len(tokens) == 1:
                out[tokens[0]] = marker.encode()
        return out

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Text to token ids (a long text in pieces cut where that changes nothing)."""
        pieces = [text] if self._cutters is None else self._cutters[parse_special].pieces(text)
        if len(pieces) == 1:
            return self._tokenize(text, add_special, parse_special)
        tokens = [t for p in pieces for t in self._tokenize(p, False, parse_special)]
        if add_special:  # BOS (and EOS where the model adds one) around the whole text
            ends = self._tokenize("", True, False)
            bos = [t for t in ends[:1] if t == self._model.token_bos()]
            tokens = bos + tokens + ends[len(bos):]
        return tokens

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 2 * int(add_special) + 1
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special,
                                     parse_special)
        if n < 0:  # NOTE: a negative result is the size the token list needs
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special,
                                         parse_special)
        return list(buf[:n])

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Token ids to text; the bytes are joined before decoding (split UTF-8 survives)."""
        if special:
            data = b"".join(self._piece(t, special=True) for t in tokens)
        else:
            data = b"".join(self.token_bytes(t) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> bytes:
        """A token's bytes with special tokens rendered as their text (/tokenize pieces)."""
        return self._piece(token, special=True)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (special tokens render empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._markers.get(token) or self._piece(token)
            self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        """Whether token ends generation (EOS, EOT and the like)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- sequences ---------------------------------------------------------------------------

    def _grammar(self, text: str) -> Gate:
        if self._guide is None:
            self._guide = Guide(self._vocab, self.info.n_vocab, self._markers)
        return self._guide.gate(text)

    @property
    def grammar_compile_s(self) -> float:
        """The last grammar compile's time (0.0: it was cached or none yet)."""
        return self._guide.compile_s if self._guide is not None else 0.0

    def open_seq(self, prompt: list[int], params: SamplingParams, *,
                 prefill_only: bool = False, partition: str = "") -> Seq | None:
        """A sequence in a free slot, keeping the KV prefix the slot already shares (of the
        same prompt-cache partition)."""
        slot = self.batch.acquire(prompt, partition)
        if slot is None:
            return None
        gate = self._grammar(params.grammar) if params.grammar and not prefill_only else None
        seq = Seq(slot.id, list(prompt), len(prompt), params, prefill_only, partition=partition)
        seq.handle = SeqSampler(params, self.info.n_vocab, gate)
        if not prefill_only and self.draft_cap(params) > 0:
            seq.drafter = SeqDrafter(prediction=params.prediction, ngram=self.draft == "ngram",
                                     model=self.draft_model is not None,
                                     floor=self.draft_floor(params), shared=self.draft_rates)
        self.batch.bind(slot, seq)
        return seq

    def draft_floor(self, params: SamplingParams) -> int:
        """The shortest draft verified for a sequence with these parameters."""
        return self.draft_min if params.draft_min is None else params.draft_min

    def draft_cap(self, params: SamplingParams) -> int:
        """The most tokens drafted per step for a sequence with these parameters."""
        return self.draft_max if params.draft_max is None else params.draft_max

    def propose(self, wanted: list[tuple[Seq, int]]) -> list[list[int]]:
        """A draft of up to k tokens for each (seq, k) the scheduler allows one (empty: none):
        the request's prediction, else the draft model (one batched run for all), else
        prompt lookup; cut where a grammar would refuse it, dropped under --draft_min."""
        drafts: list[list[int]] = []
        ask: list[int] = []
        for i, (seq, k) in enumerate(wanted):
            k = min(k, self.draft_cap(seq.params))
            drafter = seq.drafter
            draft = drafter.propose(seq.tokens, seq.n_prompt, k) if drafter is not None \
                and k > 0 else []
            if not draft and drafter is not None and drafter.wants_model and k > 0:
                ask.append(i)
            drafts.append(draft)
        if ask and self.draft_model is not None:
            made = self.draft_model.propose(
                [(wanted[i][0].slot, wanted[i][0].tokens, min(wanted[i][1], self.draft_cap(
                    wanted[i][0].params))) for i in ask])
            for i, draft in zip(ask, made, strict=True):
                drafts[i] = draft
                wanted[i][0].drafter.source = "model"
        for i, (seq, _k) in enumerate(wanted):
            draft = seq.handle.check_draft(drafts[i]) if drafts[i] else []
            drafts[i] = draft if len(draft) >= max(self.draft_floor(seq.params), 1) else []
        return drafts

    def execute(self, plan: StepPlan) -> list[tuple[Seq, int]]:
        """One decode of the scheduler's plan (drafts verified in it); the tokens sampled."""
        return self.batch.execute(plan, self.is_eog)

    def take_draft_log(self) -> list[tuple[str, int, int]]:
        """(source, drafted, accepted) of each draft verified since the last call."""
        return self.batch.take_draft_log()

    def close_seq(self, seq: Seq) -> None:
        """Free the sequence's sampler; its slot keeps the KV."""
        if seq.handle is not None:
            seq.handle.close()
            seq.handle = None
        self.batch.release(seq)

    def view(self, seq: Seq) -> SeqView:
        """The sequence as the prefix cache sees it (one StatefulEngine per sequence)."""
        return SeqView(self, seq)

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, bytes]]:
        """Sample tokens after prompt on a sequence of its own (tests and scripts)."""
        if len(prompt) >= self.info.n_ctx:
            raise ContextLengthError(len(prompt), self.info.n_ctx, param="prompt",
                                     what="prompt")
        seq = self.open_seq(prompt, params)
        if seq is None:
            raise InternalError("every sequence is busy")
        return self._run(seq)

    def _run(self, seq: Seq) -> Iterator[tuple[int, bytes]]:
        try:
            while len(seq.tokens) < self.info.n_ctx:
                # NOTE: one sequence alone: each step takes as much of it as a batch holds
                plan = StepPlan(((seq, min(seq.pending, self.n_batch)),))
                for _seq, token in self.execute(plan):
                    if not seq.params.ignore_eos and self.is_eog(token):
                        return
                    yield token, self.token_bytes(token)
        except KVFullError:
            return
        finally:
            self.close_seq(seq)

    def reset(self) -> None:
        """Forget the KV of every idle sequence."""
        self.batch.clear()

    def flush_idle(self) -> bool:
        """Store one idle sequence's KV in the prompt cache tiers; False when none is left."""
        return self.batch.flush_one()

    def llama_disk(self, directory: Path, capacity: int, partition: str = "") -> LlamaDiskCache:
        """--prompt_cache llama_disk: llama-cpp-python's LlamaDiskCache, opened on first use
        (one directory per prompt-cache partition)."""
        cache = self._disk_caches.get(partition)
        if cache is None:
            name = f"llama_disk-{partition}" if partition else "llama_disk"
            cache = LlamaDiskCache(cache_dir=str(directory / name), capacity_bytes=capacity)
            self._disk_caches[partition] = cache
        return cache

    # -- embeddings --------------------------------------------------------------------------

    @property
    def embedding_loaded(self) -> bool:
        """Whether the embedding context exists."""
        return self._embedder is not None

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings from a second context on the same weights (made on first use,
        made again, bigger, for an input longer than it holds)."""
        out = []
        for tokens in inputs:
            session = self.embed_session(tokens)
            while not session.step():
                pass
            out.append(session.vector)
        return out

    def embed_session(self, tokens: list[int]) -> EmbedSession:
        """One input's embedding, computed a chunk per step() (between decode steps)."""
        need = max(len(tokens), 1)
        if self._embedder is None or self._embedder.n_ctx < need:
            size = min(self.info.n_ctx, max(EMBED_MIN_CTX, 1 << (need - 1).bit_length()))
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
            self._embedder = _Embedder(self._model, self.info, self.batch.params, size)
        return EmbedSession(self._embedder, tokens)

    def close(self) -> None:
        """Free the model and its contexts."""
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        while self.batch.flush_one():  # NOTE: what finished since the engine was last idle
            pass
        self.batch.close()
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        if self._guide is not None:
            self._guide.close()
            self._guide = None
        self._model.close()  # type: ignore[no-untyped-call]


class SeqView:
    """One sequence of a LlamaEngine with the StatefulEngine methods the prefix cache uses."""

    def __init__(self, engine: LlamaEngine, seq: Seq):
        self.engine = engine
        self.seq = seq
        self.info = engine.info
        # NOTE: the partition's own key space: entries of another are never found
        self.fingerprint = salted(engine.fingerprint, seq.partition)

    def live_tokens(self) -> list[int]:
        """Tokens whose KV the sequence holds."""
        return self.seq.tokens[: self.seq.n_past]

    def get_state(self, *, window_only: bool = False) -> bytes:
        """The sequence's KV state (window_only: the SWA cache of an iSWA model)."""
        return self.engine.batch.get_state(self.seq.slot, window_only)

    def set_state(self, blob: bytes | bytearray, tokens: list[int]) -> bool:
        """Load a state that holds `tokens` (a prefix of the sequence's prompt)."""
        ok = self.engine.batch.set_state(self.seq.slot, blob)
        self.seq.n_past = len(tokens) if ok else 0
        return ok

    def extend(self, tokens: list[int]) -> int:
        """Not used on a batched sequence: the scheduler evaluates prompts."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the sequence's KV."""
        self.engine.batch.trim(self.seq.slot, 0)
        self.seq.n_past = 0

    def llama_disk_restore(self, tokens: list[int], directory: Path, capacity: int) -> int:
        """Restore LlamaDiskCache's longest-prefix state when it beats the live prefix, as
        llama-cpp-python's create_completion does."""
        cache = self.engine.llama_disk(directory, capacity, self.seq.partition)
        live = common_prefix(self.live_tokens(), tokens)
        try:
            item = cache[tokens]
        except KeyError:
            return live
        cached = common_prefix(item.input_ids.tolist(), tokens)
        if cached > live and self.set_state(item.llama_state, item.input_ids.tolist()):
            self.engine.batch.trim(self.seq.slot, cached)
            self.seq.n_past = cached
            return cached
        return live

    def llama_disk_save(self, directory: Path, capacity: int) -> None:
        """Store the sequence's full state under its tokens."""
        tokens = self.live_tokens()
        blob = self.get_state()
        cache = self.engine.llama_disk(directory, capacity, self.seq.partition)
        cache[tokens] = LlamaState(
            input_ids=np.array(tokens, dtype=np.intc), scores=np.zeros((0, 0), np.single),
            n_tokens=len(tokens), llama_state=blob, llama_state_size=len(blob), seed=0,
        )


class EmbedSession:
    """One input through the embedding context: step() evaluates the next chunk (True when
    the input is done); then `vector` is its pooled embedding. One session at a time per
    engine (the caller serialises them): they share the context's KV."""

    def __init__(self, embedder: _Embedder, tokens: list[int]):
        self._embedder = embedder
        self._tokens = tokens
        self._pos = 0
        self._sum = np.zeros(embedder.n_embd, dtype=np.float64)
        self.vector: list[float] = []
        embedder.clear()

    def step(self) -> bool:
        """Evaluate the next chunk; True when the embedding is ready."""
        emb = self._embedder
        if not emb.chunked:
            self.vector = emb.embed(self._tokens)
            return True
        piece = self._tokens[self._pos : self._pos + emb.n_batch]
        self._sum += emb.token_sum(piece, self._pos)
        self._pos += len(piece)
        if self._pos < len(self._tokens):
            return False
        self.vector = [float(x) for x in self._sum / max(len(self._tokens), 1)]
        return True


class _Embedder:
    """An embeddings-mode llama_context sharing the chat context's model weights.

    NOTE: pooling is fixed when a context is created, and turning embeddings on in the chat
    context would disturb its KV cache, so embeddings get a context of their own. Models
    that declare a pooling type (embedding GGUFs) keep it, and their whole input goes into
    one micro-batch (pooling needs every token at once; non-causal ones attend both ways).
    Chat models get the mean of the per-token outputs (llama.cpp's mean pooling), summed
    chunk by chunk: a causal model's later chunks attend to the earlier ones through the KV.
    """

    def __init__(self, model: _internals.LlamaModel, info: ModelInfo, chat_params: Any,
                 n_ctx: int):
        declared = info.metadata.get(f"{info.architecture}.pooling_type")
        self.chunked = declared in (None, "", str(llama_cpp.LLAMA_POOLING_TYPE_NONE))
        self.n_ctx = n_ctx
        self.n_embd = info.n_embd
        self.n_batch = min(n_ctx, EMBED_CHUNK) if self.chunked else n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = (llama_cpp.LLAMA_POOLING_TYPE_NONE if self.chunked
                               else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        params.n_threads = chat_params.n_threads
        params.n_threads_batch = chat_params.n_threads_batch
        # NOTE: the K/V types stay f16 whatever --cache_type_k/v say: this cache is small
        # (EMBED_MIN_CTX cells, more only for a longer input), cleared for every input and
        # never saved, so a quantized one would save little memory and would only make the
        # vectors depend on the chat cache's setting. Flash attention follows --flash_attn
        # (someone turning it off has a reason on that device).
        params.flash_attn_type = chat_params.flash_attn_type
        try:
            self._ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"cannot create an embedding context for {info.name}") from exc
        self._batch = _internals.LlamaBatch(
            n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False
        )
        logger.info("created an embedding context for %s (n_ctx %d)", info.name, self.n_ctx)

    def clear(self) -> None:
        """Forget the previous input."""
        if self._ctx.memory is not None:  # NOTE: non-causal embedding models have no KV memory
            llama_cpp.llama_memory_clear(self._ctx.memory, True)

    def token_sum(self, tokens: list[int], start: int) -> Any:
        """Evaluate tokens at positions start.. (after those before them); the sum of their
        per-token outputs."""
        b = self._batch.batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1
        b.n_tokens = len(tokens)
        try:
            self._ctx.decode(self._batch)
        except RuntimeError as exc:
            raise InternalError(f"embedding failed: {exc}") from exc
        ptr = llama_cpp.llama_get_embeddings(self._ctx.ctx)
        if not ptr:
            raise InternalError("the model produced no embeddings")
        rows = np.ctypeslib.as_array(ptr, shape=(len(tokens), self.n_embd))
        return rows.astype(np.float64).sum(axis=0)

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled embedding of one token list in one micro-batch (declared pooling)."""
        self.clear()
        self._batch.batch.n_tokens = 0
        self._batch.add_sequence(tokens, 0, True)
        try:
            self._ctx.decode(self._batch)
        except RuntimeError as exc:
            raise InternalError(f"embedding failed: {exc}") from exc
        ptr = llama_cpp.llama_get_embeddings_seq(self._ctx.ctx, 0)
        if not ptr:
            raise InternalError("the model produced no pooled embedding")
        return [float(x) for x in ptr[: self.n_embd]]

    def close(self) -> None:
        """Free the context (before the model it points to)."""
        self._batch.close()  # type: ignore[no-untyped-call]
        self._ctx.close()  # type: ignore[no-untyped-call]
