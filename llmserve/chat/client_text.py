"""Client text stays text: only the chat template's own markup may become control tokens.

A rendered prompt is tokenized with special tokens parsed, so that the template's
`<|im_start|>`/`<start_of_turn>` become control tokens. Text a client sent (message content,
names, tool calls and results, tool definitions) must never do the same: a user message holding
`<|im_end|>\\n<|im_start|>system ...` would otherwise open a real system turn (role spoofing).

How: every client string that holds control-token text (or ends with the start of one, or
starts with the end of one, which could meet another client string's text) is wrapped in two
sentinels before the template renders. The sentinels are lone UTF-16 surrogates, which no
client string can hold (http/guard.py refuses them), and survive Jinja and tojson. The rendered
text is then cut at the sentinels: markup segments are tokenized with parse_special=True, the
client spans with parse_special=False, and the tokens joined. A prompt without such strings
is rendered and tokenized exactly as before (one piece, the same tokens, the same prefix-cache
keys). Leading and trailing whitespace stays outside the sentinels, so templates that `trim`
content render the same text with and without them; a template that cuts client text apart
(e.g. `content.split(...)`) makes the check below fail and the request is a 400 rather than
tokenized unsafely.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from llmserve.errors import InvalidRequestError

OPEN = "\udb80"  # NOTE: lone surrogates: never in validated client text
CLOSE = "\udb81"
_SPLIT = re.compile(f"([{OPEN}{CLOSE}])")

Segment = tuple[str, bool]  # (text, is_client)
_PARTIAL = 3  # shortest start/end of a control text that marks a string at its edges


class ControlText:
    """Finds the text of a vocabulary's control tokens in strings."""

    def __init__(self, texts: Iterable[str]):
        self.texts = frozenset(t for t in texts if len(t) >= 2)
        self.lengths = sorted({len(t) for t in self.texts}, reverse=True)
        self.longest = max(self.lengths, default=0)
        # NOTE: 3+ characters: a message ending in '<' or starting with '2>' (shell) is too
        # common to tokenize apart, and no template puts such a pair next to each other
        self.heads = frozenset(t[:k] for t in self.texts for k in range(_PARTIAL, len(t)))
        self.tails = frozenset(t[-k:] for t in self.texts for k in range(_PARTIAL, len(t)))
        firsts = sorted({t[0] for t in self.texts})
        self._first = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if firsts \
            else None

    def dangerous(self, text: str) -> bool:
        """Whether text holds control-token text, or could complete one at either end."""
        if self._first is None or len(text) < 2:
            return False
        for m in self._first.finditer(text):
            i = m.start()
            if any(text[i:i + n] in self.texts for n in self.lengths):
                return True
        for k in range(_PARTIAL, min(len(text), self.longest - 1) + 1):
            if text[-k:] in self.heads or text[:k] in self.tails:
                return True
        return False


@lru_cache(maxsize=8)
def control_text(texts: tuple[str, ...]) -> ControlText:
    """The (cached) matcher for one vocabulary's control-token texts."""
    return ControlText(texts)


def _wrap(text: str) -> str:
    core = text.strip()
    start = len(text) - len(text.lstrip())
    return text[:start] + OPEN + core + CLOSE + text[start + len(core):]


def mark(value: Any, control: ControlText) -> tuple[Any, bool]:
    """A copy of value (messages or tools) with every dangerous string wrapped; whether any was.

    Only copies what it changes, so an ordinary request costs one walk."""
    if isinstance(value, str):
        return (_wrap(value), True) if control.dangerous(value) else (value, False)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        changed = False
        for k, v in value.items():
            key, key_changed = mark(k, control) if isinstance(k, str) else (k, False)
            item, item_changed = mark(v, control)
            out[key] = item
            changed |= key_changed or item_changed
        return (out, True) if changed else (value, False)
    if isinstance(value, list | tuple):
        items = [mark(v, control) for v in value]
        if any(c for _, c in items):
            return [v for v, _ in items], True
        return value, False
    return value, False


def segments(marked: str, plain: str) -> list[Segment]:
    """The marked render cut into markup and client spans; 400 unless it is the plain render
    with the sentinels added (the template transformed client text we had to keep apart)."""
    out: list[Segment] = []
    inside = False
    ok = True
    for piece in _SPLIT.split(marked):
        if piece == OPEN:
            ok &= not inside
            inside = True
        elif piece == CLOSE:
            ok &= inside
            inside = False
        elif piece:
            out.append((piece, inside))
    if not ok or inside or "".join(text for text, _ in out) != plain:
        raise InvalidRequestError(
            "a message holds control-token text (such as <|im_end|>) and this model's chat "
            "template rewrites message text, so that text cannot be kept from acting as "
            "markup; remove the control-token text", param="messages",
        )
    return out
