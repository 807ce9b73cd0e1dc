"""MessagesService: Anthropic Messages on top of ChatService (no FastAPI here).

A Messages request is converted to a chat request (llmserve/anthropic/convert.py) and runs
through ChatService.chat like any chat completion; for in-process models its `on_prompt` hook,
on the engine thread, appends a prefill, pins the prefix of the furthest cache_control
breakpoint in the prefix cache and counts the prompt tokens the cache will newly store
(cache_creation_input_tokens).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmserve.anthropic.convert import Converted, to_chat
from llmserve.anthropic.events import Part, Thinking
from llmserve.anthropic.schemas import CountTokensRequest, MessagesRequest
from llmserve.backends.in_process import InProcessBackend
from llmserve.cache.manager import in_partition
from llmserve.chat.plan import ChatPlan, plan_chat
from llmserve.engine.base import Engine, common_prefix
from llmserve.errors import LlmserveError
from llmserve.service import (
    ChatService,
    Finished,
    Generation,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)

logger = logging.getLogger(__name__)


@dataclass
class PromptFacts:
    """What the engine thread learnt at admission (written before Started is emitted), and what
    the conversion left out of the prompt (`Warning` headers)."""

    warnings: tuple[str, ...] = ()
    tokens: int = 0
    created: int = 0  # prompt tokens the prefix cache lacks and will store for this prompt
    pinned: int = 0  # prompt tokens pinned by the furthest cache_control breakpoint


class MessagesService:
    """Creates Anthropic Messages and counts their tokens."""

    def __init__(self, chat: ChatService, local: InProcessBackend):
        self.chat = chat
        self.local = local  # NOTE: the in-process engine, whose prefix cache on_prompt pins in

    def _pin_plan(self, conv: Converted) -> ChatPlan | None:
        if conv.pin is None:
            return None
        try:
            return plan_chat(conv.pin)
        except LlmserveError as exc:  # a cut of a valid request: never fail it for a pin
            logger.warning("cache_control prefix not pinned: %s", exc.message)
            return None

    def _tokens(self, engine: Engine, conv: Converted, tokens: list[int]) -> list[int]:
        if not conv.prefill:
            return tokens
        return tokens + engine.tokenize(conv.prefill, add_special=False, parse_special=False)

    async def create(self, req: MessagesRequest) -> tuple[Generation, PromptFacts]:
        """Start generating a Message; raises request errors before any output exists."""
        conv = to_chat(req)
        pin_plan = self._pin_plan(conv)
        facts = PromptFacts(conv.warnings)
        cache = self.local.cache
        part = self.local.partition(conv.chat.cache_salt)

        def on_prompt(raw: Engine, rendered: list[int]) -> list[int]:
            tokens = self._tokens(raw, conv, rendered)
            engine = in_partition(raw, part)  # NOTE: the cache entries this request may see
            if pin_plan is not None:
                # NOTE: the pinned prefix is what the rendering of the conversation cut at the
                # breakpoint shares with the whole prompt: templates close a message (or
                # open the next) differently, and tokens at the cut may merge.
                cut = self.local.chat_tokens(raw, pin_plan)
                facts.pinned = cache.pin(engine, tokens[: common_prefix(cut, tokens)],
                                         conv.pin_seconds)
            facts.tokens = len(tokens)
            facts.created = cache.uncached(engine, tokens)
            return tokens

        gen = await self.chat.chat(conv.chat, on_prompt)
        return gen, facts

    async def count_tokens(self, req: CountTokensRequest) -> tuple[int, tuple[str, ...]]:
        """The prompt's token count, rendered exactly as /v1/messages renders it, and the
        conversion's warnings."""
        conv = to_chat(req)

        def on_prompt(engine: Engine, tokens: list[int]) -> list[int]:
            return self._tokens(engine, conv, tokens)

        return await self.chat.count_tokens(conv.chat, on_prompt), conv.warnings


async def parts(gen: Generation) -> AsyncIterator[Part | Finished]:
    """A generation's output as Message parts, then its Finished."""
    async for event in gen:
        if isinstance(event, TextDelta):
            yield event.text
        elif isinstance(event, ReasoningDelta):
            yield Thinking(event.text)  # a thinking block, streamed as thinking_delta
        elif isinstance(event, ToolCallDelta | Finished):
            yield event


def cache_usage(gen: Generation, facts: PromptFacts) -> tuple[int, int, int]:
    """(prompt tokens, cache read, cache creation) as known now: creation is capped so the
    three parts of Anthropic's usage add up to the prompt."""
    read = gen.cached_tokens or 0
    return gen.prompt_tokens, read, max(0, min(facts.created, gen.prompt_tokens - read))
