"""A reference GBNF recognizer for tests: does a grammar accept a whole string?

Runs the rules llmserve.chat.gbnf parses (llama.cpp's representation) on the same pushdown
stacks llama.cpp uses, one code point at a time.
"""

from __future__ import annotations

from llmserve.chat import gbnf
from llmserve.chat.gbnf_parser import (
    ALT,
    CHAR,
    CHAR_ALT,
    CHAR_ANY,
    CHAR_NOT,
    CHAR_RNG_UPPER,
    END,
    Element,
)


def _match(rule: list[Element], i: int, ch: int) -> tuple[bool, int]:
    """llama_grammar_match_char: (matched, index after the char set)."""
    positive = rule[i][0] in (CHAR, CHAR_ANY)
    assert positive or rule[i][0] == CHAR_NOT
    found = False
    while True:
        kind, value = rule[i]
        if rule[i + 1][0] == CHAR_RNG_UPPER:
            found = found or value <= ch <= rule[i + 1][1]
            i += 2
        elif kind == CHAR_ANY:
            found = True
            i += 1
        else:
            found = found or value == ch
            i += 1
        if rule[i][0] != CHAR_ALT:
            return found == positive, i


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
            ok, after = _match(rules[rule_id], i, ord(ch))
            if ok:
                rest = stack[:-1]
                if rules[rule_id][after][0] not in (END, ALT):
                    rest = (*rest, (rule_id, after))
                gbnf.advance(rules, rest, nxt)
        stacks = nxt
        if not stacks:
            return False
    return () in stacks
