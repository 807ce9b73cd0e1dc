"""The engine protocol and the plain data passed across it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


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

        The caller stops early by closing the iterator.
        """
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...
