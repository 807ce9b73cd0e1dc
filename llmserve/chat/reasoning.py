"""Reasoning ("thinking") in chat output, split from the answer as it streams.

Formats, recognised in `auto` mode by the markup the reply opens with (or the generation
prompt leaves open):
  think    <think> ... </think> answer            Qwen3, DeepSeek-R1 and its distills, QwQ
  harmony  <|channel|>analysis<|message|> ... <|end|><|start|>assistant<|channel|>final
           <|message|> answer                      gpt-oss
Markup only counts at the start of the reply: `<think>` later in an answer is content. The
tags never reach the content, even split across tokens (a possible tag prefix is held back).
A gpt-oss tool call (`<|channel|>commentary to=functions.NAME ...<|message|>{args}`) comes out
as the bare JSON call object `{"name": NAME, "arguments": {args}}` the json parser reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from llmserve.config import ReasoningFormat

__all__ = ["ReasoningFormat", "ReasoningSetup", "ReasoningSplitter", "answer_only",
           "setup_for", "template_variables"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CHANNEL, MESSAGE, START, END = "<|channel|>", "<|message|>", "<|start|>", "<|end|>"
HARMONY_ENDS = (END, START, CHANNEL, "<|return|>", "<|call|>")
ANALYSIS = "analysis"
# Template variables a request may not set through chat_template_kwargs.
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token",
                                "eos_token", "raise_exception", "strftime_now"})

Part = tuple[bool, str]  # (is reasoning, text)


@dataclass(frozen=True)
class ReasoningSetup:
    """How one chat reply is read: `opened` is the block the generation prompt left open."""

    opened: Literal["think", "harmony"] | None = None


def setup_for(prompt: str, fmt: ReasoningFormat) -> ReasoningSetup | None:
    """The reasoning setup for a rendered chat prompt (None: leave the output as it is)."""
    if fmt == "none":
        return None
    tail = prompt.rstrip()
    if tail.endswith(THINK_OPEN):
        return ReasoningSetup("think")
    if tail.endswith(f"{CHANNEL}{ANALYSIS}{MESSAGE}"):
        return ReasoningSetup("harmony")
    return ReasoningSetup()


def answer_only(prompt: str, setup: ReasoningSetup | None) -> tuple[str, ReasoningSetup | None]:
    """A prompt whose generation prompt opened `<think>`, with the thinking closed (empty):
    for grammars that constrain the answer (tool_choice required/named, response_format)."""
    if setup is None or setup.opened != "think":
        return prompt, setup
    return f"{prompt.rstrip()}\n{THINK_CLOSE}\n\n", ReasoningSetup()


def template_variables(
    kwargs: dict[str, Any] | None, effort: str | None, thinking: bool | None
) -> dict[str, Any]:
    """Extra chat template variables: reasoning_effort, enable_thinking/thinking, then the
    request's chat_template_kwargs (which win). Raises ValueError naming a reserved key."""
    out: dict[str, Any] = {}
    if effort is not None:
        out["reasoning_effort"] = effort
        if effort == "none" and thinking is None:
            thinking = False
    if thinking is not None:
        # NOTE: Qwen3 templates read enable_thinking, DeepSeek-V3.1's read thinking.
        out["enable_thinking"] = out["thinking"] = thinking
    for key, value in (kwargs or {}).items():
        if key in RESERVED_VARIABLES:
            raise ValueError(f"{key!r} cannot be set through chat_template_kwargs")
        out[key] = value
    return out


def _find(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The first whole marker in buf (index, marker); else (how much of buf is safe, None)."""
    best: tuple[int, str | None] = (-1, None)
    for m in markers:
        i = buf.find(m)
        if i >= 0 and (best[1] is None or i < best[0]):
            best = (i, m)
    if best[1] is not None:
        return best
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), hold, -1):
            if buf.endswith(m[:k]):
                hold = k
                break
    return len(buf) - hold, None


class ReasoningSplitter:
    """Feed generated text; get (is_reasoning, text) parts. Not thread-safe, one per choice.

    Reasoning is trimmed of the whitespace around it, and the answer after it of its leading
    whitespace; a reply without reasoning markup passes through unchanged."""

    def __init__(self, setup: ReasoningSetup | None = None):
        opened = setup.opened if setup else None
        self._state = {"think": "think", "harmony": "body"}.get(opened or "", "start")
        self._channel = ANALYSIS if opened == "harmony" else ""
        self._call = False  # the harmony body is a tool call's arguments
        self._buf = ""
        self._ws = ""  # reasoning's trailing whitespace, held back
        self._lead = True  # strip the leading whitespace of the next part
        self._out: list[Part] = []
        self.blocks = 0  # reasoning blocks closed so far

    @property
    def thinking(self) -> bool:
        """Whether the output is inside reasoning now."""
        return self._state == "think" or (self._state == "body" and self._channel == ANALYSIS)

    @property
    def undecided(self) -> bool:
        """Whether markup read so far may still open reasoning (`<thi`, a channel header)."""
        return self._state in ("start", "header", "role", "between")

    def feed(self, text: str) -> list[Part]:
        """Parts for the next piece of generated text."""
        self._buf += text
        while self._buf and self._step():
            pass
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Part]:
        """Everything held back, at the end of generation."""
        buf, self._buf = self._buf, ""
        if self._state in ("start", "content", "between"):
            self._content(buf, strip=self._state != "start" and self.blocks > 0)
        elif self._state == "think" or (self._state == "body" and self._channel == ANALYSIS):
            self._reason(buf)
        elif self._state == "body":
            self._content(buf)
            if self._call:
                self._content("}")
        out, self._out = self._out, []
        return out

    # -- states: each step consumes some of the buffer; False: wait for more text ----------

    def _step(self) -> bool:
        return bool(getattr(self, f"_s_{self._state}")())

    def _s_start(self) -> bool:
        head = self._buf.lstrip()
        for marker, state in ((THINK_OPEN, "think"), (CHANNEL, "header"), (START, "role")):
            if head.startswith(marker):
                self._buf = head[len(marker):]
                self._state, self._lead = state, True
                return True
            if marker.startswith(head):
                return False  # could still become this marker
        self._state = "content"
        return True

    def _s_content(self) -> bool:
        buf, self._buf = self._buf, ""
        self._content(buf, strip=self.blocks > 0)
        return False

    def _content(self, text: str, *, strip: bool = False) -> None:
        if strip and self._lead:
            text = text.lstrip()
        if text:
            self._lead = False
            self._out.append((False, text))

    def _reason(self, text: str, *, final: bool = True) -> None:
        """Reasoning text; its trailing whitespace waits for more (dropped when final)."""
        if self._lead:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            self._lead = False
            self._out.append((True, self._ws + body))
            self._ws = ""
        self._ws = "" if final else self._ws + text[len(body):]

    def _close_reasoning(self) -> None:
        self.blocks += 1
        self._lead, self._ws = True, ""

    def _s_think(self) -> bool:
        i, marker = _find(self._buf, (THINK_CLOSE,))
        self._reason(self._buf[:i], final=False)
        self._buf = self._buf[i:]
        if marker is None:
            return False
        self._buf = self._buf[len(marker):]
        self._close_reasoning()
        self._state = "content"
        return True

    def _s_header(self) -> bool:
        i = self._buf.find(MESSAGE)
        if i < 0:
            return False
        header, self._buf = self._buf[:i], self._buf[i + len(MESSAGE):]
        words = header.split()
        self._channel = words[0] if words else ""
        self._call = False
        for word in words[1:]:
            if word.startswith("to=functions."):
                name = word[len("to=functions."):].split("<|", 1)[0]
                self._content(f'{{"name": {json.dumps(name)}, "arguments": ', strip=True)
                self._call = True
        self._state, self._lead = "body", True
        return True

    def _s_body(self) -> bool:
        i, marker = _find(self._buf, HARMONY_ENDS)
        text, self._buf = self._buf[:i], self._buf[i:]
        if self._channel == ANALYSIS:
            self._reason(text, final=False)
        else:
            self._content(text, strip=True)
        if marker is None:
            return False
        self._buf = self._buf[len(marker):]
        if self._channel == ANALYSIS:
            self._close_reasoning()
        elif self._call:
            self._content("}")
            self._call = False
        self._state = {START: "role", CHANNEL: "header"}.get(marker, "between")
        return True

    def _s_role(self) -> bool:
        # NOTE: `<|start|>assistant` before the next channel: the role name is dropped.
        i, marker = _find(self._buf, (CHANNEL, MESSAGE))
        if marker is None:
            self._buf = self._buf[i:]
            return False
        self._buf = self._buf[i + len(marker):]
        if marker == CHANNEL:
            self._state = "header"
        else:
            self._state, self._channel, self._lead = "body", "final", True
        return True

    def _s_between(self) -> bool:
        head = self._buf.lstrip()
        for marker, state in ((START, "role"), (CHANNEL, "header")):
            if head.startswith(marker):
                self._buf, self._state = head[len(marker):], state
                return True
            if marker.startswith(head):
                return False
        self._state = "content"
        return True
