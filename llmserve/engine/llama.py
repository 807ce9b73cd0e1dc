"""LlamaEngine: the one module that imports llama_cpp."""

from __future__ import annotations

import ctypes
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar

from llmserve.config import Settings
from llmserve.engine.base import ModelInfo, SamplingParams
from llmserve.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

# Control tokens that mark tool calls: rendered as text so the tool-call parsers see them
# (other control tokens render empty).
TOOL_MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]",
                "<|python_tag|>")


class LlamaEngine:
    """A GGUF model loaded in-process through llama-cpp-python."""

    def __init__(self, llm: llama_cpp.Llama, path: Path):
        self._llm = llm
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
                verbose=settings.log_level == "debug",
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc
        return cls(llm, path)

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

    def detokenize(self, tokens: list[int]) -> str:
        """Token ids to text."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (special tokens render empty)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._markers.get(token) or self._piece(token)
            self._piece_cache[token] = piece
        return piece

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, bytes]]:
        """Sample tokens after the prompt, reusing the longest matching KV prefix."""
        grammar = self._grammar(params.grammar) if params.grammar else None
        return self._generate(prompt, params, grammar)

    def _grammar(self, text: str) -> LlamaGrammar:
        # NOTE: llama-cpp-python adds whatever llama.cpp returns to the sampler chain, and a
        # grammar llama.cpp cannot parse comes back NULL and crashes the process at the first
        # token. chat/gbnf.py rejects those first; this check is the last line of defence.
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
        if not sampler:
            raise InvalidRequestError("llama.cpp could not parse the grammar", param="grammar",
                                      code="invalid_grammar")
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(text, verbose=False)

    def _generate(
        self, prompt: list[int], params: SamplingParams, grammar: LlamaGrammar | None
    ) -> Iterator[tuple[int, bytes]]:
        llm = self._llm
        llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        tokens = llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens:
                if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return
                yield token, self.token_bytes(token)
        finally:
            tokens.close()

    def close(self) -> None:
        """Free the model and its context."""
        self._llm.close()
