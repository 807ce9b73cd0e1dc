"""A scripted engine for unit tests of HTTP, streaming and parsing logic (no llama.cpp)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from llmserve.engine.base import ModelInfo, SamplingParams

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

    def close(self) -> None:
        """Mark closed."""
        self.closed = True
