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

# NOTE: suffixes this long are looked up, longest first; a shorter match proposes too much
# that is wrong (a rejected draft costs compute on a CPU, where the batch is compute-bound):
# on the code edits of benchmarks/speculative.py, 49-71% of the drafted tokens of 2-4-token
# matches were accepted, 63-90% with 3-4 (llama-server's ngram-simple matches 4).
NGRAM_MAX = 4
NGRAM_MIN = 3
RESYNC = 3  # tokens of the output's tail that must match to pick a prediction up again


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

    def update(self, tokens: list[int], upto: int | None = None) -> None:
        """Index the n-grams of tokens[:upto] not indexed yet (a list only grows)."""
        upto = len(tokens) if upto is None else upto
        seen = self._seen
        for end in range(max(self._n + 1, NGRAM_MIN), upto + 1):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
                seen[tuple(tokens[end - n:end])] = end
        self._n = max(self._n, upto)

    def find(self, tokens: list[int], start: int = 0, least: int = NGRAM_MIN) -> int | None:
        """The index just after the latest indexed occurrence of the longest suffix of tokens
        (of `least` tokens at least, all at or after start); None: none."""
        for n in range(min(NGRAM_MAX, len(tokens) - start), max(least, NGRAM_MIN) - 1, -1):
            end = self._seen.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return end
        return None


def ngram_draft(index: NgramIndex, tokens: list[int], k: int) -> list[int]:
    """Prompt lookup: up to k tokens that followed the longest suffix of tokens at its latest
    earlier occurrence in tokens (the index holds every n-gram but the suffix's own)."""
    index.update(tokens, len(tokens) - 1)
    end = index.find(tokens)
    return tokens[end:end + k] if end is not None and k > 0 else []


class PredictionCursor:
    """Follows a request's prediction (token ids) along the output: the draft is what comes
    after the place where the output's last tokens are in the prediction."""

    def __init__(self, prediction: list[int]):
        self.tokens = prediction
        self._pos: int | None = 0  # where the output goes on in the prediction (None: lost)
        self._done = 0  # output tokens followed so far
        self._index = NgramIndex()
        self._index.update(prediction)

    def propose(self, tokens: list[int], start: int, k: int) -> list[int]:
        """Up to k tokens after the output so far: tokens[start:] (the sampled tokens, the
        last one not yet evaluated)."""
        pred = self.tokens
        for i in range(start + self._done, len(tokens)):
            pos, token = self._pos, tokens[i]
            self._pos = pos + 1 if pos is not None and pos < len(pred) and pred[pos] == token \
                else None
        self._done = len(tokens) - start
        if self._pos is None:
            # NOTE: the output left the prediction: find its tail in it (three tokens: two
            # match too often in code, e.g. indentation, and a wrong place drafts nonsense)
            self._pos = self._index.find(tokens, start, RESYNC)
        if k <= 0 or self._pos is None:
            return []
        return pred[self._pos:self._pos + k]


# NOTE: what a source's drafted tokens are expected to be accepted at before any was
# verified (per token, each given the ones before it were); then the sequence's own record.
PRIOR_RATE = {"prediction": 0.9, "ngram": 0.6, "model": 0.7}
PRIOR_WEIGHT = 4.0  # the prior counts as this many verified tokens
FORGET = 0.9  # each verification keeps this share of the record before it
RECOVER = 0.05  # each skipped draft moves the record this share back towards the prior


FORGET_SHARED = 0.99  # FORGET and RECOVER for a model's record over all its sequences
RECOVER_SHARED = 0.01


class SourceRates:
    """Each draft source's acceptance over all of one model's sequences so far: where a new
    sequence's estimate starts (PRIOR_RATE before the source has drafted on this model), and
    where a sequence's estimate drifts back to while it does not draft. How well prompt
    lookup pays depends on the model and the workload, not on one request."""

    def __init__(self) -> None:
        self._record = {src: (rate * PRIOR_WEIGHT, PRIOR_WEIGHT)
                        for src, rate in PRIOR_RATE.items()}

    def rate(self, source: str) -> float:
        accepted, tested = self._record[source]
        return accepted / tested

    def skipped(self, source: str) -> None:
        """A draft of the source was not verified: drift back towards PRIOR_RATE, so that a
        source that paid badly for a while is tried again."""
        keep = 1.0 - RECOVER_SHARED
        acc, tested = self._record[source]
        self._record[source] = (acc * keep + PRIOR_RATE[source] * PRIOR_WEIGHT * RECOVER_SHARED,
                                tested * keep + PRIOR_WEIGHT * RECOVER_SHARED)

    def verified(self, source: str, accepted: float, tested: float) -> None:
        old_acc, old_tested = self._record[source]
        self._record[source] = (old_acc * FORGET_SHARED + accepted,
                                old_tested * FORGET_SHARED + tested)


class SeqDrafter:
    """One sequence's draft sources, in order: its request's prediction, then the draft model
    (asked by the engine for all sequences at once), then prompt lookup; and each source's
    acceptance rate so far (the scheduler sizes drafts by it, scheduler.best_draft)."""

    def __init__(self, *, prediction: tuple[int, ...], ngram: bool, model: bool,
                 floor: int = 0, shared: SourceRates | None = None):
        self.floor = floor  # --draft_min: a shorter draft is not used, a longer one is kept
        self._shared = shared if shared is not None else SourceRates()
        self._cursor = PredictionCursor(list(prediction)) if prediction else None
        self._index = NgramIndex() if ngram else None
        self.wants_model = model
        self.source = ""  # of the draft being verified
        # per source: (tokens accepted, tokens tested), recent ones weighing more
        self._record = {src: (self._shared.rate(src) * PRIOR_WEIGHT, PRIOR_WEIGHT)
                        for src in PRIOR_RATE}

    @property
    def rate(self) -> float:
        """The chance that a drafted token of the current source is accepted, given that the
        tokens before it were."""
        accepted, tested = self._record.get(self.source, (0.0, 1.0))
        return accepted / tested if tested else 0.0

    def skipped(self) -> None:
        """A draft of the current source was not worth verifying: its record drifts back
        towards the model's rate for the source, so a source that failed for a while is
        tried again later."""
        record = self._record.get(self.source)
        if record is None:
            return
        keep = 1.0 - RECOVER
        self._shared.skipped(self.source)
        prior = self._shared.rate(self.source) * PRIOR_WEIGHT * RECOVER
        self._record[self.source] = (record[0] * keep + prior,
                                     record[1] * keep + PRIOR_WEIGHT * RECOVER)

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of the current source was verified: `accepted` of `drafted` kept."""
        if self.source not in self._record or not drafted:
            return
        # NOTE: geometric: the tokens after the first rejected one were never tested
        tested = accepted + (1 if accepted < drafted else 0)
        old_acc, old_tested = self._record[self.source]
        self._record[self.source] = (old_acc * FORGET + accepted, old_tested * FORGET + tested)
        self._shared.verified(self.source, accepted, tested)

    def propose(self, tokens: list[int], n_prompt: int, k: int) -> list[int]:
        """A draft from the prediction or prompt lookup (empty: none; the engine may then
        ask the draft model)."""
        self.source = ""
        if self._cursor is not None:
            draft = self._cursor.propose(tokens, n_prompt, k)
            if draft:
                self.source = "prediction"
                return draft
        if self._index is not None and not self.wants_model:
            draft = ngram_draft(self._index, tokens, k)
            if draft:
                self.source = "ngram"
                return draft
        return []
