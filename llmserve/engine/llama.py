"""LlamaEngine: the one module that imports llama_cpp."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp.llama_cache import LlamaDiskCache

from llmserve.config import Settings
from llmserve.engine.base import MIN_EVAL, ModelInfo, SamplingParams
from llmserve.errors import InternalError, InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

# Control tokens that mark tool calls: rendered as text so the tool-call parsers see them
# (other control tokens render empty).
TOOL_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]",
                "<|python_tag|>")


def _fingerprint(path: Path, llm: llama_cpp.Llama) -> str:
    """Identifies the weights and KV layout: a cache entry never restores into another model."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(1 << 22))
        f.seek(max(0, size - (1 << 22)))
        h.update(f.read(1 << 22))
    params = llm.context_params
    h.update(
        f"{size}|{llama_cpp.__version__}|{params.type_k}|{params.type_v}|"
        f"{params.flash_attn_type}|{params.swa_full}".encode()
    )
    return h.hexdigest()


class _GrammarGate:
    """A GBNF grammar as llama.cpp's common sampler uses it: check the sampled token only."""

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
        self._full: _internals.LlamaTokenDataArray | None = None

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts token next."""
        entry: Any = self._one[0]
        entry.id, entry.logit, entry.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._one_array))
        return bool(np.isfinite(entry.logit))

    def mask(self, logits: Any, n_vocab: int) -> None:
        """Set the logit of every token the grammar rejects to -inf, in llama.cpp's buffer."""
        values = np.ctypeslib.as_array(logits, shape=(n_vocab,))
        if self._full is None:
            self._full = _internals.LlamaTokenDataArray(n_vocab=n_vocab)
        self._full.copy_logits(values)
        llama_cpp.llama_sampler_apply(self._smpl, ctypes.byref(self._full.candidates))
        values[np.isneginf(self._full.candidates_data.logit)] = -np.inf

    def sampler(self, llm: llama_cpp.Llama) -> Any:
        """A replacement for llm.sample (Llama.generate calls it with idx=...)."""

        def sample(**kwargs: Any) -> int:
            ridx = kwargs["idx"] - llm.n_tokens
            assert llm._sampler is not None
            token = int(llm._sampler.sample(llm._ctx, ridx))
            if not self.allows(token):
                logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, ridx)
                self.mask(logits, llm.n_vocab())
                token = int(llm._sampler.sample(llm._ctx, ridx))
            llama_cpp.llama_sampler_accept(self._smpl, token)
            return token

        return sample

    def close(self) -> None:
        """Free the grammar sampler."""
        if self._smpl:
            llama_cpp.llama_sampler_free(self._smpl)
            self._smpl = None


class LlamaEngine:
    """A GGUF model loaded in-process through llama-cpp-python."""

    def __init__(self, llm: llama_cpp.Llama, path: Path, fingerprint: str = ""):
        self._llm = llm
        self.fingerprint = fingerprint
        self._disk_cache: LlamaDiskCache | None = None
        self._embedder: _Embedder | None = None
        self._vocab = llm._model.vocab
        self._piece_cache: dict[int, bytes] = {}
        meta = dict(llm.metadata)
        model = llm._model
        bos_id = model.token_bos()
        eos_id = model.token_eos()
        self.info = ModelInfo(
            name=path.name,
            path=str(path),
            n_ctx=llm.n_ctx(),
            architecture=meta.get("general.architecture", ""),
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=self._special_text(bos_id),
            eos_token=self._special_text(eos_id),
            add_bos=bool(model.add_bos_token()),
            bos_token_id=bos_id if bos_id >= 0 else None,
            n_vocab=model.n_vocab(),
            n_embd=model.n_embd(),
            metadata=meta,
        )
        self._markers = self._marker_tokens()

    @classmethod
    def load(cls, path: Path, settings: Settings) -> LlamaEngine:
        """Load a GGUF file with the server's settings."""
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=settings.n_ctx,
                n_gpu_layers=settings.n_gpu_layers,
                n_threads=settings.n_threads,
                n_batch=settings.n_batch,
                # NOTE: a full-size sliding-window cache keeps every position, so any prefix of
                # a Gemma 3 context can be kept or restored (see llmserve/cache/).
                swa_full=True,
                verbose=settings.log_level == "debug",
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
        return cls(llm, path, _fingerprint(path, llm))

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

    def _marker_tokens(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for marker in TOOL_MARKERS:
            tokens = self.tokenize(marker, add_special=False, parse_special=True)
            if len(tokens) == 1:
                out[tokens[0]] = marker.encode()
        return out

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Text to token ids."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_special, parse_special))

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Token ids to text; the bytes are joined before decoding (split UTF-8 survives)."""
        if special:
            data = b"".join(self._piece(t, special=True) for t in tokens)
        else:
            data = b"".join(self.token_bytes(t) for t in tokens)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (special tokens render empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._markers.get(token) or self._piece(token)
            self._piece_cache[token] = piece
        return piece

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, bytes]]:
        """Sample tokens after the prompt, reusing the longest matching KV prefix."""
        gate = self._grammar(params.grammar) if params.grammar else None
        return self._generate(prompt, params, gate)

    def _grammar(self, text: str) -> _GrammarGate:
        return _GrammarGate(self._vocab, text)

    def _generate(
        self, prompt: list[int], params: SamplingParams, gate: _GrammarGate | None
    ) -> Iterator[tuple[int, bytes]]:
        llm = self._llm
        keep = len(prompt) - MIN_EVAL
        if llm.n_tokens > keep and self.live_tokens()[:keep] == prompt[: max(keep, 0)]:
            self._truncate(max(keep, 0))
        llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        if gate is not None:
            # NOTE: llama-cpp-python's grammar sampler checks every vocabulary entry on every
            # token; like llama.cpp's common sampler we sample first and check only the chosen
            # token, masking and resampling when the grammar rejects it.
            llm.sample = gate.sampler(llm)  # type: ignore[method-assign]
        tokens = llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )
        try:
            for token in tokens:
                if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return
                yield token, self.token_bytes(token)
        finally:
            tokens.close()
            if gate is not None:
                del llm.sample
                gate.close()

    def live_tokens(self) -> list[int]:
        """Tokens whose KV is in the context now."""
        return [int(t) for t in self._llm.input_ids[: self._llm.n_tokens]]

    def get_state(self, *, window_only: bool = False) -> bytes:
        """The KV state of sequence 0 (window_only: the SWA cache of an iSWA model)."""
        ctx = self._llm._ctx.ctx
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if window_only else 0
        size = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, flags)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(ctx, buf, size, 0, flags)
        return bytes(memoryview(buf)[:written])

    def set_state(self, blob: bytes | bytearray, tokens: list[int]) -> bool:
        """Load a sequence state that holds `tokens`; the next generate evaluates the rest."""
        llm = self._llm
        # NOTE: hand llama.cpp the buffer itself (it only reads it) instead of a copy
        buf: Any
        if isinstance(blob, bytearray):
            buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        else:
            buf = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(blob), 0) != len(blob):
            self.reset()
            return False
        llm.n_tokens = len(tokens)
        llm.input_ids[: len(tokens)] = tokens
        # NOTE: restored KV has no logits: make generate() evaluate at least one token.
        llm._requires_eval = True
        return True

    def extend(self, tokens: list[int]) -> int:
        """Evaluate what the context lacks of `tokens`; returns how many were evaluated."""
        llm = self._llm
        live = self.live_tokens()
        common = 0
        for a, b in zip(live, tokens, strict=False):
            if a != b:
                break
            common += 1
        if common < len(live):
            self._truncate(common)
        if common < len(tokens):
            llm.eval(tokens[common:])
            llm._requires_eval = False
        return len(tokens) - common

    def llama_disk_restore(self, tokens: list[int], directory: Path, capacity: int) -> int:
        """--prompt_cache llama_disk: llama-cpp-python's LlamaDiskCache, used as its
        create_completion uses it (longest-prefix state restored when it beats the live one)."""
        cache = self._llama_disk(directory, capacity)
        llm = self._llm
        live = int(llama_cpp.Llama.longest_token_prefix(self.live_tokens(), tokens))
        try:
            item = cache[tokens]
        except KeyError:
            return live
        cached = int(llama_cpp.Llama.longest_token_prefix(item.input_ids.tolist(), tokens))
        if cached > live:
            llm.load_state(item)
            return cached
        return live

    def llama_disk_save(self, directory: Path, capacity: int) -> None:
        """Store the live sequence's full state, as create_completion does."""
        self._llama_disk(directory, capacity)[self.live_tokens()] = self._llm.save_state()

    def _llama_disk(self, directory: Path, capacity: int) -> LlamaDiskCache:
        if self._disk_cache is None:
            self._disk_cache = LlamaDiskCache(
                cache_dir=str(directory / "llama_disk"), capacity_bytes=capacity
            )
        return self._disk_cache

    def _truncate(self, n: int) -> None:
        """Keep the KV of the first n live tokens only."""
        llm = self._llm
        llm._ctx.kv_cache_seq_rm(-1, n, -1)
        llm.n_tokens = n
        llm._requires_eval = True

    def reset(self) -> None:
        """Forget the live tokens (their KV is overwritten by the next eval)."""
        self._llm.reset()  # type: ignore[no-untyped-call]
        self._llm._ctx.kv_cache_clear()  # type: ignore[no-untyped-call]

    @property
    def embedding_loaded(self) -> bool:
        """Whether the embedding context exists."""
        return self._embedder is not None

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Pooled embeddings from a second context on the same weights (made on first use)."""
        if self._embedder is None:
            self._embedder = _Embedder(self._llm, self.info)
        return [self._embedder.embed(tokens) for tokens in inputs]

    def close(self) -> None:
        """Free the model and its contexts."""
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._llm.close()


class _Embedder:
    """An embeddings-mode llama_context sharing the chat context's model weights.

    NOTE: pooling is fixed when a context is created, and turning embeddings on in the chat
    context would disturb its KV cache, so embeddings get a context of their own. Models
    that declare a pooling type (embedding GGUFs) keep it; chat models get mean pooling.
    The whole input goes into one micro-batch because pooling needs every token at once.
    """

    def __init__(self, llm: llama_cpp.Llama, info: ModelInfo):
        declared = info.metadata.get(f"{info.architecture}.pooling_type")
        pooling = (
            llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
            if declared not in (None, "", str(llama_cpp.LLAMA_POOLING_TYPE_NONE))
            else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        )
        self.n_ctx = info.n_ctx
        self.n_embd = info.n_embd
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = pooling
        params.n_threads = llm.context_params.n_threads
        params.n_threads_batch = llm.context_params.n_threads_batch
        try:
            self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"cannot create an embedding context for {info.name}") from exc
        self._batch = _internals.LlamaBatch(
            n_tokens=self.n_ctx, embd=0, n_seq_max=1, verbose=False
        )
        logger.info("created an embedding context for %s (n_ctx %d)", info.name, self.n_ctx)

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled embedding of one token list (1 <= len <= n_ctx, checked by the caller)."""
        if self._ctx.memory is not None:  # NOTE: non-causal embedding models have no KV memory
            llama_cpp.llama_memory_clear(self._ctx.memory, True)
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
