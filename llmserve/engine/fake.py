"""A scripted engine for unit tests of HTTP, streaming and parsing logic (no llama.cpp).

It is an executor like LlamaEngine (open_seq, execute(plan), close_seq): a sequence's prompt
is evaluated as the scheduler's plans say, and each time all of its tokens are in, the next
piece of the script is its sampled token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from llmserve.engine.base import ModelInfo, SamplingParams, Seq, StepPlan

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class FakeEngine:
    """Tokens are characters; generation replays a script of text pieces, one token each."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 2048,
        script: list[str] | None = None,
        token_delay: float = 0.0,
        chat_template: str | None = CHATML,
        fail_after: int | None = None,
        embed_delay: float = 0.0,
        n_parallel: int = 4,
        n_batch: int = 512,
    ):
        self.info = ModelInfo(
            name=path.name, path=str(path), n_ctx=n_ctx, architecture="fake",
            chat_template=chat_template, bos_token="<s>", eos_token="</s>",
            n_vocab=0x110000, n_embd=8,
        )
        self.embedding_loaded = False
        self.script = list(script) if script is not None else ["Hello", ",", " world", "!"]
        self.token_delay = token_delay
        self.fail_after = fail_after  # raise RuntimeError after this many tokens (tests)
        self.embed_delay = embed_delay  # seconds per embedded input
        self.embedded = 0  # inputs embedded, for cancellation tests
        self.generated = 0  # tokens produced, for cancellation tests
        self.closed = False
        self.thread_ids: set[int] = set()
        self.params: list[SamplingParams] = []  # every generate call's params, for tests
        self.prompts: list[str] = []  # every generate call's prompt, as text
        self.trace: list[int] = []  # which generation (index into prompts) made each token
        self.n_parallel = n_parallel  # sequences at once (the server passes --parallel)
        self.n_batch = n_batch
        self._live: set[int] = set()  # busy slots

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """One token per character."""
        return [ord(c) for c in text]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """Inverse of tokenize."""
        return "".join(chr(t) for t in tokens)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """A deterministic vector per input: token-id sums by position modulo 8, minus 3."""
        self.embedding_loaded = True
        self.thread_ids.add(threading.get_ident())
        out = []
        for tokens in inputs:
            if self.embed_delay:
                time.sleep(self.embed_delay)
            self.embedded += 1
            vec = [0.0] * self.info.n_embd
            for i, t in enumerate(tokens):
                vec[i % self.info.n_embd] += t % 7 - 3
            out.append(vec)
        return out

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, bytes]]:
        """Replay the script (cycling forever with ignore_eos)."""
        self.params.append(params)
        self.prompts.append(self.detokenize(prompt))
        return self._replay(params, len(self.prompts) - 1)

    def _replay(self, params: SamplingParams, gen: int) -> Iterator[tuple[int, bytes]]:
        self.thread_ids.add(threading.get_ident())
        i = 0
        while params.ignore_eos or i < len(self.script):
            if self.token_delay:
                time.sleep(self.token_delay)
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("the fake engine failed mid-generation")
            piece = self.script[i % len(self.script)]
            i += 1
            self.generated += 1
            self.trace.append(gen)
            yield i, piece.encode()

    # -- the executor ----------------------------------------------------------------------

    def open_seq(self, prompt: list[int], params: SamplingParams, *,
                 prefill_only: bool = False, partition: str = "") -> Seq | None:
        """A sequence in a free slot (no KV is ever reused: the whole prompt is evaluated)."""
        free = [i for i in range(self.n_parallel) if i not in self._live]
        if not free:
            return None
        seq = Seq(free[0], list(prompt), len(prompt), params, prefill_only, partition=partition)
        seq.handle = None if prefill_only else self.generate(prompt, params)
        self._live.add(seq.slot)
        return seq

    def execute(self, plan: StepPlan) -> list[tuple[Seq, int, bytes | None]]:
        """Evaluate the plan's tokens; each sequence whose tokens are all in gets the next
        script piece as (seq, token, bytes), or (seq, -1, None) when the script is done."""
        out: list[tuple[Seq, int, bytes | None]] = []
        for seq, n in plan.items:
            if n < 1 or n > seq.pending:
                raise ValueError(f"a plan of {n} tokens for a sequence with {seq.pending}")
            seq.n_past += n
            if seq.pending or seq.prefill_only:
                continue
            try:
                token, piece = next(seq.handle)
            except StopIteration:
                out.append((seq, -1, None))
                continue
            seq.tokens.append(token)
            out.append((seq, token, piece))
        return out

    def close_seq(self, seq: Seq) -> None:
        """Stop the sequence's script; its slot is free."""
        close = getattr(seq.handle, "close", None)
        if close is not None:
            close()
        seq.handle = None
        self._live.discard(seq.slot)

    def is_eog(self, token: int) -> bool:
        """The end of the script (execute() reports it as token -1)."""
        return token < 0

    def token_bytes(self, token: int) -> bytes:
        """Nothing: execute() returns each token's bytes itself."""
        return b""

    def close(self) -> None:
        """Mark closed."""
        self.closed = True
