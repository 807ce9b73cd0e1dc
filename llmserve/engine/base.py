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
    metadata: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """One loaded model. Not thread-safe: the scheduler calls it from one thread."""

    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Text to token ids."""
        ...

    def detokenize(self, tokens: list[int]) -> str:
        """Token ids to text."""
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
