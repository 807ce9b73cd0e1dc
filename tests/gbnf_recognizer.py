"""A reference GBNF recognizer for tests: does a grammar accept a whole string?

Runs the rules llmserve.chat.gbnf parses (llama.cpp's representation) on the same pushdown
stacks llama.cpp uses, one code point at a time.
"""

from __future__ import annotations

from llmserve.chat import gbnf
from llmserve.chat.gbnf_parser import (
    ALT,
    END,
)


def accepts(grammar: str, text: str) -> bool:
    """Whether `text` is in the language of `grammar` (its `root` rule)."""
    rules, symbols = gbnf.parse(grammar)
    stacks = gbnf.initial_stacks(rules, symbols["root"])
    for ch in text:
        nxt: set[gbnf.Stack] = set()
        for stack in stacks:
            if not stack:
                continue
            rule_id, i = stack[-1]
            ok, after = gbnf.match_char(rules[rule_id], i, ord(ch))
            if ok:
                rest = stack[:-1]
                if rules[rule_id][after][0] not in (END, ALT):
                    rest = (*rest, (rule_id, after))
                gbnf.advance(rules, rest, nxt)
        stacks = nxt
        if not stacks:
            return False
    return () in stacks
