"""Where a long text can be cut so that tokenizing the pieces gives exactly its tokens.

llama.cpp's tokenizer first splits the text at every special (control or user-defined) token
it finds, one token text at a time over a list of fragments; on a long text with many such
tokens (Gemma's `\\n` is a user-defined token) that costs O(specials x fragments): 672k chars
of chat turns took 15-17 s on Gemma 3, 1.7 s for a quarter of them. Fragments on either side
of a special token are tokenized independently anyway, so cutting the text right before a
special token's text, where no other special text straddles the cut, changes nothing; pieces
of a few thousand characters make the cost linear. (Tokens with lstrip/rstrip attributes eat
neighbouring spaces across such a cut: the engine does not cut for vocabularies that have any.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CHUNK_CHARS = 8192
_SEARCH_CHARS = 1 << 16  # how far past a target to look for a cut


class Cutter:
    """Cut points for one set of special-token texts."""

    def __init__(self, texts: Iterable[str]):
        self.texts = frozenset(t for t in texts if t)
        self.lengths = sorted({len(t) for t in self.texts})
        firsts = sorted({t[0] for t in self.texts})
        self._first = (re.compile("[" + "".join(re.escape(c) for c in firsts) + "]")
                       if firsts else None)

    def _starts_special(self, text: str, i: int) -> bool:
        return any(text[i:i + n] in self.texts for n in self.lengths)

    def _straddled(self, text: str, i: int) -> bool:
        """Whether some special text starting before i ends after it."""
        for n in self.lengths:
            for start in range(max(0, i - n + 1), i):
                if text[start:start + n] in self.texts:
                    return True
        return False

    def _cut_near(self, text: str, target: int) -> int | None:
        assert self._first is not None
        end = min(len(text), target + _SEARCH_CHARS)
        for m in self._first.finditer(text, target, end):
            i = m.start()
            if self._starts_special(text, i) and not self._straddled(text, i):
                return i
        return None

    def pieces(self, text: str, size: int = CHUNK_CHARS) -> list[str]:
        """text cut before special-token texts into pieces of about size characters."""
        if self._first is None or len(text) <= 2 * size:
            return [text]
        out: list[str] = []
        start = 0
        while len(text) - start > 2 * size:
            cut = self._cut_near(text, start + size)
            if cut is None:
                break
            out.append(text[start:cut])
            start = cut
        out.append(text[start:])
        return out
