"""Draft sources for speculative decoding: what a sequence's next tokens probably are.

A draft is a guess; one decode step evaluates the sequence's next token and its draft
together, and the executor (engine/batch.py) keeps the prefix of the draft that the sampler
would have produced anyway. Sources:
  prediction  the request's `prediction` (OpenAI Predicted Outputs): the text the output is
              expected to repeat, followed from where the output last matched it
  ngram       prompt lookup: the continuation of the sequence's last few tokens at their most
              recent earlier occurrence in its prompt and output
  model       a smaller model with the same vocabulary (engine/draft_model.py), greedy
Plain Python on token ids; runs on the engine thread between steps.
"""

from __future__ import annotations

from typing import Protocol

# NOTE: suffixes this long are looked up, longest first; a one-token match proposes too much
# that is wrong (a rejected draft costs compute on a CPU, where the batch is compute-bound).
NGRAM_MAX = 4
NGRAM_MIN = 2


class DraftModel(Protocol):
    """A smaller model drafting for the sequences of a bigger one (same vocabulary)."""

    name: str

    def propose(self, items: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (slot, tokens, k): up to k tokens the draft model would produce after
        `tokens` (the sequence's prompt and output so far), greedily. Its own KV per slot
        keeps what it evaluated before; only the tokens it lacks are evaluated."""
        ...

    def close(self) -> None:
        """Free the draft model and its context."""
        ...


class NgramIndex:
    """Where each n-gram (NGRAM_MIN..NGRAM_MAX tokens) of a token list last ended, kept up to
    date as the list grows (each new token costs a few dict updates)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, ...], int] = {}  # n-gram -> the index just after it
        self._n = 0  # tokens indexed

    def update(self, tokens: list[int]) -> None:
        """Index tokens[self._n:] (tokens only ever grow; a shorter list starts over)."""
        if len(tokens) < self._n:
            self._seen.clear()
            self._n = 0
        seen = self._seen
        for end in range(max(self._n, NGRAM_MIN), len(tokens) + 1):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
                seen[tuple(tokens[end - n:end])] = end
        self._n = len(tokens)

    def find(self, tokens: list[int]) -> int | None:
        """The index just after the latest indexed occurrence of the longest suffix of tokens
        (NGRAM_MIN tokens at least); None: none."""
        for n in range(min(NGRAM_MAX, len(tokens)), NGRAM_MIN - 1, -1):
            end = self._seen.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return end
        return None

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix of tokens at its latest earlier
        occurrence. Call before update(tokens): the suffix itself is not indexed yet."""
        if k <= 0:
            return []
        for n in range(min(NGRAM_MAX, len(tokens)), NGRAM_MIN - 1, -1):
            end = self._seen.get(tuple(tokens[len(tokens) - n:]))
            if end is not None and end < len(tokens):
                return tokens[end:end + k]
        return []


class PredictionCursor:
    """Follows a request's prediction (token ids) along the output: the draft is what comes
    after the place where the output's last tokens are in the prediction."""

    def __init__(self, prediction: list[int]):
        self.tokens = prediction
        self._pos: int | None = 0  # where the output goes on in the prediction (None: lost)
        self._done = 0  # output tokens followed so far
        self._index = NgramIndex()
        self._index.update(prediction)

    def propose(self, output: list[int], k: int) -> list[int]:
        """Up to k tokens after the output so far (the sampled tokens, the last one not yet
        evaluated)."""
        pred = self.tokens
        for token in output[self._done:]:
            pos = self._pos
            self._pos = pos + 1 if pos is not None and pos < len(pred) and pred[pos] == token \
                else None
        self._done = len(output)
        if self._pos is None:  # NOTE: the output left the prediction: find its tail in it
            self._pos = self._index.find(output)
        if k <= 0 or self._pos is None:
            return []
        return pred[self._pos:self._pos + k]
