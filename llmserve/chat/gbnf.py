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
    initial_stacks(parser.rules, parser.symbol_ids[root], MAX_STACKS)
