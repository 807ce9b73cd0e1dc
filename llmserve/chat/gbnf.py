"""Check a GBNF grammar in Python before llama.cpp sees it.

NOTE: llama.cpp does not fail gracefully on every bad grammar. Measured on llama-cpp-python
0.3.36: deeply nested parentheses overflow the C stack (SIGSEGV), `"a"{5,3}` allocates until the
process dies, a character no token can produce (`"\\x00"`, `[\\U00300000]`) aborts at the first
sampled token, and a rule graph with many shared prefixes makes grammar set-up take exponential
time on the engine thread (16 levels: 6 s; 18 levels: 273 s). chat/gbnf_parser.py mirrors
llama.cpp's parser; this module adds the checks for those cases on the parsed rules (reachable
characters, left recursion as llama.cpp defines it, the cost of its left-recursion walk, the
number of parse stacks it starts with), so a bad grammar is a 400 and never reaches the engine.
"""

from __future__ import annotations

from llmserve.chat.gbnf_parser import (
    ALT,
    CHAR,
    CHAR_ALT,
    CHAR_ANY,
    CHAR_NOT,
    CHAR_RNG_UPPER,
    END,
    REF,
    Element,
    GrammarError,
    Parser,
    parse,
)

__all__ = ["GrammarError", "advance", "initial_stacks", "parse", "validate"]

MAX_GRAMMAR_CHARS = 256 * 1024
MAX_LEFT_WALK = 1_000_000
MAX_STACKS = 2000  # llama.cpp's per-token cost grows with its parse stacks (times the vocab)
# Stacks one accepted character may produce before llama.cpp dedupes them (it dedupes with a
# linear search, and masks the vocabulary against each). Measured on SmolLM2 (2 cores):
# 40 alternatives `"a" root?` (40 x 41 = 1640) took 9 s per token, 100 never produced one
# in 40 s, 20 (420) took 5.7 s for its first token, 12 (156) 1.7 s; 400 distinct `"wN" root?`
# (400 stacks, one per character) ran at ~0.5-1 s per token.
MAX_STEP_STACKS = 256
_PROBE_DEPTH = 3  # characters simulated
_PROBE_SETS = 32  # stack sets followed per depth (the most ambiguous)
_PROBE_CHARS = 64  # characters tried per stack set
MAX_CHAR = 0x10FFFF


def _check_chars(rule: list[Element]) -> str | None:
    """A description of the first character set no token can ever produce, if any."""
    i = 0
    while i < len(rule):
        kind = rule[i][0]
        if kind not in (CHAR, CHAR_NOT):
            i += 1
            continue
        ranges: list[tuple[int, int]] = []
        j = i
        while True:
            lo = rule[j][1]
            hi = lo
            if j + 1 < len(rule) and rule[j + 1][0] == CHAR_RNG_UPPER:
                hi = rule[j + 1][1]
                j += 1
            ranges.append((lo, hi))
            j += 1
            if j >= len(rule) or rule[j][0] != CHAR_ALT:
                break
        # NOTE: llama.cpp treats code point 0 as end of text; nothing above U+10FFFF is text.
        if kind == CHAR:
            ok = any(lo <= MAX_CHAR and hi >= 1 and lo <= hi for lo, hi in ranges)
        else:
            covered = sorted((max(lo, 1), min(hi, MAX_CHAR)) for lo, hi in ranges if lo <= hi)
            nxt = 1
            for lo, hi in covered:
                if lo > nxt:
                    break
                nxt = max(nxt, hi + 1)
            ok = nxt <= MAX_CHAR
        if not ok:
            return ", ".join(f"U+{lo:04X}-U+{hi:04X}" for lo, hi in ranges)
        i = j
    return None


def _alternatives(rule: list[Element]) -> list[list[Element]]:
    out: list[list[Element]] = [[]]
    for elem in rule:
        if elem[0] in (ALT, END):
            out.append([])
        else:
            out[-1].append(elem)
    return out[:-1]


def _left_refs(
    rules: dict[int, list[Element]], may_be_empty: dict[int, bool]
) -> dict[int, list[int]]:
    """The rules llama.cpp's left-recursion check walks into from each rule (with repeats)."""
    out: dict[int, list[int]] = {}
    for rule_id, rule in rules.items():
        refs: list[int] = []
        for alt in _alternatives(rule):
            for kind, value in alt:
                if kind != REF:
                    break
                refs.append(value)
                if not may_be_empty[value]:
                    break
        out[rule_id] = refs
    return out


def _check_left_recursion(rules: dict[int, list[Element]], names: dict[int, str]) -> None:
    # llama.cpp: a rule "may be empty" only if one of its alternatives is literally empty.
    may_be_empty = {rid: any(not alt for alt in _alternatives(r)) for rid, r in rules.items()}
    graph = _left_refs(rules, may_be_empty)
    state: dict[int, int] = {}  # 1 = in progress, 2 = done
    walk: dict[int, int] = {}  # calls llama.cpp's unmemoised walk makes from a rule
    for start in rules:
        if state.get(start):
            continue
        stack: list[tuple[int, int]] = [(start, 0)]
        state[start] = 1
        while stack:
            node, i = stack[-1]
            children = graph[node]
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if state.get(child) == 1:
                    raise GrammarError(
                        f"invalid grammar: left recursion in rule {names[child]!r}",
                        param="grammar",
                    )
                if not state.get(child):
                    state[child] = 1
                    stack.append((child, 0))
            else:
                stack.pop()
                state[node] = 2
                walk[node] = min(MAX_LEFT_WALK + 1, 1 + sum(walk[c] for c in children))
    total = sum(walk[s] for s in _walk_starts(rules, graph))
    if total > MAX_LEFT_WALK:
        raise GrammarError(
            "invalid grammar: too many paths through leading rule references "
            "(llama.cpp would take exponential time to check it)",
            param="grammar",
        )


def _walk_starts(rules: dict[int, list[Element]], graph: dict[int, list[int]]) -> list[int]:
    """Rules llama.cpp starts a walk from: in id order, skipping those already walked."""
    seen: set[int] = set()
    starts: list[int] = []
    for rule_id in sorted(rules):
        if rule_id in seen:
            continue
        starts.append(rule_id)
        todo = [rule_id]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
    return starts


Stack = tuple[tuple[int, int], ...]


def alternative_starts(rule: list[Element]) -> list[int]:
    """Index of the first element of each alternative of a rule."""
    return [0] + [i + 1 for i, (kind, _) in enumerate(rule) if kind == ALT]


def advance(
    rules: dict[int, list[Element]], stack: Stack, out: set[Stack], limit: int | None = None
) -> None:
    """llama_grammar_advance_stack: expand rule references until each stack tops a char set.

    Stacks hold (rule id, element index) from bottom to top; an empty stack means the
    grammar is complete. Raises GrammarError once `out` would exceed `limit` stacks.
    """
    todo = [stack]
    seen: set[Stack] = set()
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur:
            rule_id, i = cur[-1]
            kind, value = rules[rule_id][i]
            if kind == REF:
                rest = cur[:-1]
                if rules[rule_id][i + 1][0] not in (END, ALT):
                    rest = (*rest, (rule_id, i + 1))
                for start in alternative_starts(rules[value]):
                    empty = rules[value][start][0] in (END, ALT)
                    todo.append(rest if empty else (*rest, (value, start)))
                continue
        out.add(cur)
        if limit is not None and len(out) > limit:
            raise GrammarError(
                f"invalid grammar: more than {limit} ways to start (too ambiguous for llama.cpp)",
                param="grammar",
            )


def initial_stacks(
    rules: dict[int, list[Element]], root: int, limit: int | None = None
) -> set[Stack]:
    """The parse stacks llama.cpp starts from."""
    stacks: set[Stack] = set()
    for start in alternative_starts(rules[root]):
        empty = rules[root][start][0] in (END, ALT)
        advance(rules, () if empty else ((root, start),), stacks, limit)
    return stacks


def match_char(rule: list[Element], i: int, ch: int) -> tuple[bool, int]:
    """llama_grammar_match_char: (matched, index after the char set)."""
    positive = rule[i][0] in (CHAR, CHAR_ANY)
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


def _probe_chars(rules: dict[int, list[Element]], stacks: set[Stack]) -> list[int]:
    """Characters worth trying next: the low end of every char set on top of a stack."""
    chars: set[int] = set()
    for stack in stacks:
        if stack:
            rule_id, i = stack[-1]
            rule = rules[rule_id]
            while True:
                value = rule[i][1] if rule[i][0] != CHAR_ANY else ord("a")
                chars.add(max(1, value))
                i += 2 if rule[i + 1][0] == CHAR_RNG_UPPER else 1
                if rule[i][0] != CHAR_ALT:
                    break
    return sorted(chars)[:_PROBE_CHARS]


def _check_ambiguity(rules: dict[int, list[Element]], start: set[Stack]) -> None:
    """400 when accepting one character makes llama.cpp expand too many stacks.

    Simulates llama_grammar_accept for a few characters along the char sets the grammar
    offers; `"a" root? | "a" root? | ...` passes every other check but each `a` multiplies."""
    frontier = [start]
    for _ in range(_PROBE_DEPTH):
        produced: list[set[Stack]] = []
        seen: set[frozenset[Stack]] = set()
        for stacks in frontier:
            for ch in _probe_chars(rules, stacks):
                nxt: set[Stack] = set()
                work = 0
                for stack in stacks:
                    if not stack:
                        continue
                    rule_id, i = stack[-1]
                    ok, after = match_char(rules[rule_id], i, ch)
                    if not ok:
                        continue
                    rest = stack[:-1]
                    if rules[rule_id][after][0] not in (END, ALT):
                        rest = (*rest, (rule_id, after))
                    one: set[Stack] = set()
                    advance(rules, rest, one, MAX_STEP_STACKS)
                    work += len(one)
                    nxt |= one
                    if work > MAX_STEP_STACKS:
                        raise GrammarError(
                            f"invalid grammar: one character ({chr(ch)!r}) continues more than "
                            f"{MAX_STEP_STACKS} ways (too ambiguous for llama.cpp)",
                            param="grammar",
                        )
                key = frozenset(nxt)
                if nxt and key not in seen:
                    seen.add(key)
                    produced.append(nxt)
        frontier = sorted(produced, key=len, reverse=True)[:_PROBE_SETS]


def validate(grammar: str, root: str = "root") -> None:
    """Raise GrammarError (400) unless llama.cpp can use this grammar safely."""
    if not grammar.strip():
        raise GrammarError("invalid grammar: it is empty", param="grammar")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(
            f"invalid grammar: longer than {MAX_GRAMMAR_CHARS} characters", param="grammar"
        )
    if "\0" in grammar:
        raise GrammarError("invalid grammar: contains a NUL character", param="grammar")
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GrammarError("invalid grammar: not valid UTF-8", param="grammar") from exc
    parser = Parser(grammar)
    parser.parse()
    if root not in parser.symbol_ids:
        raise GrammarError(f"invalid grammar: no {root!r} rule", param="grammar")
    names = {v: k for k, v in parser.symbol_ids.items()}
    for rule_id, rule in parser.rules.items():
        bad = _check_chars(rule)
        if bad:
            raise GrammarError(
                f"invalid grammar: rule {names[rule_id]!r} needs a character no model can "
                f"produce ({bad})",
                param="grammar",
            )
    _check_left_recursion(parser.rules, names)
    stacks = initial_stacks(parser.rules, parser.symbol_ids[root], MAX_STACKS)
    _check_ambiguity(parser.rules, stacks)
