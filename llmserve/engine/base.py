"""The engine protocol and the plain data passed across it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# NOTE: llama.cpp's CPU kernels give a slightly different result for a 1-token batch than for
# the same token inside a larger batch. Re-evaluating at least this many prompt tokens after a
# cache hit keeps the first sampled token identical to an uncached run (tests/test_cache_real).
MIN_EVAL = 4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF, already checked by llmserve.chat.gbnf


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the server needs to know about a loaded model."""

    name: str
    path: str
    n_ctx: int
    architecture: str = ""
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    bos_token_id: int | None = None
    n_vocab: int = 0  # valid token ids are 0 .. n_vocab-1
    n_embd: int = 0  # embedding width
    metadata: dict[str, str] = field(default_factory=dict)
    # A chat template the catalog (models.yaml `chat_template`) sets; wins over all others.
    template_override: str | None = None


class Engine(Protocol):
    """One loaded model. Not thread-safe: the scheduler calls it from one thread."""

    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Text to token ids."""
        ...

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Token ids to text (special=True renders control tokens such as `<|im_end|>`)."""
        ...

    @property
    def embedding_loaded(self) -> bool:
        """Whether the embedding context of this model is in memory."""
        ...

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One pooled (not normalised) embedding per token list.

        Loads the model's embedding context on first use; chat state is untouched.
        """
        ...

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, bytes]]:
        """Yield (token id, its bytes) until end-of-generation (or forever with ignore_eos).

        Raises before returning the iterator if the engine rejects params (a grammar).
        The caller stops early by closing the iterator.
        """
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...


@runtime_checkable
class StatefulEngine(Engine, Protocol):
    """An engine whose KV state can be saved and restored (the prefix cache needs this)."""

    fingerprint: str

    def live_tokens(self) -> list[int]:
        """Tokens whose KV is in the context now."""
        ...

    def get_state(self, *, window_only: bool = False) -> bytes:
        """The KV state of the live tokens (llama_state_seq_get_data layout); window_only:
        just the sliding-window cache of a SWA model."""
        ...

    def set_state(self, blob: bytes | bytearray, tokens: list[int]) -> bool:
        """Replace the context's KV with blob, which holds `tokens`; False if refused."""
        ...

    def extend(self, tokens: list[int]) -> int:
        """Make the context hold exactly `tokens`, reusing the live prefix; returns evaluated."""
        ...

    def reset(self) -> None:
        """Forget the live tokens."""
        ...
