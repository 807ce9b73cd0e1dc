"""Limits checked before expensive work: text that cannot fit the context is refused before
it is tokenized (tokenizing costs ~1-2 us per character; a 32 MiB body would hold the engine
thread for a minute)."""

from __future__ import annotations

from llmserve.engine.base import ModelInfo
from llmserve.errors import ContextLengthError, InvalidRequestError

# /tokenize may count texts longer than one context (to plan chunking), up to this many.
TOKENIZE_CONTEXTS = 2


def check_text_fits(text: str, info: ModelInfo, param: str, contexts: int = 1) -> None:
    """400 context_length_exceeded when text has more characters than `contexts` contexts
    could hold: no token stands for more than info.max_token_bytes bytes (>= characters)."""
    if not info.max_token_bytes:
        return
    most = info.n_ctx * info.max_token_bytes * contexts
    if len(text) > most:
        # NOTE: no token is longer than max_token_bytes, so this many tokens at least.
        at_least = -(-len(text) // info.max_token_bytes)
        raise ContextLengthError(
            at_least, info.n_ctx * contexts, param=param,
            what="messages" if param == "messages" else "input",
            hint=f"(the text is {len(text)} characters, more than {most} could fit)",
        )


def check_token_ids(tokens: list[int], n_vocab: int, param: str) -> None:
    """400 for ids outside the vocabulary (llama.cpp would read out of bounds)."""
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the model's vocabulary (0..{n_vocab - 1})",
            param=param,
        )
