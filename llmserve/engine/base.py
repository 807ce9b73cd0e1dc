"""The engine protocol and the plain data passed across it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

# NOTE: llama.cpp's CPU kernels give a slightly different result for a 1-token batch than for
# the same token inside a larger batch. Re-evaluating at least this many prompt tokens after a
# cache hit keeps the first sampled token identical to an uncached run (tests/test_cache_real).
MIN_EVAL = 4


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
    grammar: str | None = None  # an llguidance grammar (llmserve.chat.constraints)
    logprobs: int | None = None  # report each sampled token's logprob and this many top ones
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id within the vocab, bias)
    # speculative decoding (engine/drafting.py): the most tokens drafted per step (None: the
    # model's --draft_max; 0: no drafting) and a draft shorter than draft_min is not verified
    draft_max: int | None = None
    draft_min: int | None = None
    prediction: tuple[int, ...] = ()  # OpenAI Predicted Outputs: the expected output's tokens


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
    # Texts of the vocabulary's control tokens (what parse_special turns into control ids):
    # client text holding them is tokenized as plain text (chat/client_text.py).
    control_tokens: tuple[str, ...] = ()
    # An upper bound on the bytes one token stands for (0: unknown): a text longer than
    # n_ctx * this cannot fit the context, so it is refused before tokenizing.
    max_token_bytes: int = 0
    # The KV cache's element types, flash attention as llama.cpp resolved it ("on"/"off"; the
    # request, e.g. "auto", when it did not say) and the KV buffer's bytes (None: unknown).
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    kv_bytes: int | None = None


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


@dataclass(eq=False)
class Seq:
    """One sequence of a batch: the tokens it must hold and how far its KV has got.

    `tokens` is the prompt, then each sampled token appended; the KV holds tokens[:n_past].
    A sequence needs evaluating while n_past < len(tokens); the step that evaluates its last
    token samples the next one (unless prefill_only).
    """

    slot: int
    tokens: list[int]
    n_prompt: int
    params: SamplingParams
    prefill_only: bool = False
    n_past: int = 0
    reused: int = 0  # prompt tokens whose KV came from a cache, a sibling or the slot itself
    handle: Any = None  # the engine's per-sequence state (its sampler)
    # per sampled token not yet taken by its request (in order): its logprob and the top
    # (id, logprob) pairs, when params.logprobs
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # preempted: its KV was swapped out to the prefix cache (or dropped); not stepped until
    # the scheduler resumes it
    paused: bool = False
    # when it closes, its slot's KV is stored in the prompt cache tiers, later: when the
    # engine is idle or before the slot's KV is dropped (never on the next turn's path)
    cache_on_close: bool = False
    # the prompt-cache partition (llmserve/tenancy.py): KV of another partition, in a slot,
    # a sibling or the cache tiers, is never reused for this sequence
    partition: str = ""
    # the most tokens it may still sample in all (None: until the context ends): a draft
    # never goes past it
    max_new: int | None = None
    # speculative decoding: the engine's per-sequence draft state, and what its drafts did
    drafter: Any = None
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, kept
    predicted: int = 0  # of drafted, from the request's prediction
    predicted_accepted: int = 0

    def keep_limit(self) -> int:
        """The most prompt KV that may be reused: a prompt that samples re-evaluates its last
        MIN_EVAL tokens, so the first token matches an uncached run."""
        return self.n_prompt if self.prefill_only else max(self.n_prompt - MIN_EVAL, 0)

    @property
    def pending(self) -> int:
        """Tokens still to evaluate."""
        return len(self.tokens) - self.n_past

    def can_sample(self) -> int | None:
        """Tokens it may still sample (None: no limit but the context)."""
        if self.max_new is None:
            return None
        return self.n_prompt + self.max_new - len(self.tokens)


class KVFullError(Exception):
    """The KV cache has no room for this step's tokens."""


@dataclass(frozen=True)
class StepPlan:
    """One decode step as the scheduler decided it: each sequence with how many of its
    pending tokens to evaluate (from seq.n_past on), in batch order. Plain data: the
    executor fills its batch from it and decides nothing."""

    items: tuple[tuple[Seq, int], ...] = ()
    # speculative decoding: tokens drafted after a sequence's last pending token, verified in
    # the same decode (only for a sequence whose item takes all its pending tokens)
    drafts: tuple[tuple[Seq, tuple[int, ...]], ...] = ()

    def draft_of(self, seq: Seq) -> tuple[int, ...]:
        """The draft verified after seq's tokens in this step (empty: none)."""
        for s, draft in self.drafts:
            if s is seq:
                return draft
        return ()

    @property
    def n_tokens(self) -> int:
        """Tokens in the step, drafts included."""
        return sum(n for _, n in self.items) + sum(len(d) for _, d in self.drafts)

    @property
    def seqs(self) -> list[Seq]:
        """The sequences in the step, in batch order."""
        return [seq for seq, _ in self.items]

    def __bool__(self) -> bool:
        return bool(self.items)


class BatchEngine(Protocol):
    """The executor: advances several sequences with one decode per step (engine thread)."""

    info: ModelInfo
    n_parallel: int
    n_batch: int  # the most tokens one step can hold

    def open_seq(self, prompt: list[int], params: SamplingParams, *,
                 prefill_only: bool = False, partition: str = "") -> Seq | None:
        """A sequence for prompt in a free slot (None: every slot busy); raises 400 on a bad
        grammar. Its slot's KV keeps the longest prefix it already held for this partition
        (seq.n_past)."""
        ...

    def execute(self, plan: StepPlan) -> list[tuple[Any, ...]]:
        """One decode of the plan's tokens; samples each sequence whose tokens are all in
        (not prefill_only); returns (sequence, token) sampled, or (sequence, token, bytes or
        None at the end). Raises KVFullError when they do not fit."""
        ...

    def close_seq(self, seq: Seq) -> None:
        """The sequence is done; its slot keeps its KV for a later prompt to reuse."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether token ends generation."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for."""
        ...


def as_batch(engine: Engine) -> BatchEngine:
    """A loaded engine as the executor the scheduler drives (every engine factory's engines
    are both: LlamaEngine, the tests' FakeEngine)."""
    if not callable(getattr(engine, "execute", None)):
        raise TypeError(f"{type(engine).__name__} has no execute(plan): not a BatchEngine")
    return cast(BatchEngine, engine)


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
