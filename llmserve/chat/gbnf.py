"""Check a GBNF grammar in Python before llama.cpp sees it.

NOTE: llama.cpp does not fail gracefully on every bad grammar. Measured on llama-cpp-python
0.3.36: deeply nested parentheses overflow the C stack (SIGSEGV), `"a"{5,3}` allocates until the
process dies, a character no token can produce (`"\\x00"`, `[\\U00300000]`) aborts at the first
sampled token, and a rule graph with many shared prefixes makes its left-recursion check take
exponential time on the engine thread. This module mirrors llama.cpp's parser (same syntax,
same repetition rewriting, same left-recursion rule) and adds limits for those cases, so a bad
grammar is a 400 and never reaches the engine.
"""

from __future__ import annotations

from llmserve.errors import InvalidRequestError

# llama_gretype
END, ALT, REF, CHAR, CHAR_NOT, CHAR_RNG_UPPER, CHAR_ALT, CHAR_ANY = range(8)
Element = tuple[int, int]

MAX_GRAMMAR_CHARS = 256 * 1024
MAX_NESTING = 64
MAX_RULES = 20_000
MAX_LEFT_WALK = 1_000_000
MAX_STACKS = 2000  # llama.cpp's per-token cost grows with its parse stacks (times the vocab)
REPETITION_THRESHOLD = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_CHAR = 0x10FFFF


class GrammarError(InvalidRequestError):
    """The grammar is invalid or outside what llama.cpp handles safely."""

    code = "invalid_grammar"


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


class _Parser:
    """A port of llama_grammar_parser (src/llama-grammar.cpp) that only checks."""

    def __init__(self, src: str):
        self.src = src
        self.symbol_ids: dict[str, int] = {}
        self.rules: dict[int, list[Element]] = {}
        self.depth = 0

    def fail(self, message: str, pos: int) -> GrammarError:
        snippet = self.src[pos : pos + 30]
        return GrammarError(f"invalid grammar: {message} at {snippet!r}", param="grammar")

    def at(self, pos: int) -> str:
        # NOTE: "" plays the C string's NUL terminator.
        return self.src[pos] if pos < len(self.src) else ""

    def symbol(self, name: str) -> int:
        return self.symbol_ids.setdefault(name, len(self.symbol_ids))

    def generate_symbol(self, base: str) -> int:
        new_id = len(self.symbol_ids)
        self.symbol_ids[f"{base}_{new_id}"] = new_id
        return new_id

    def add_rule(self, rule_id: int, rule: list[Element]) -> None:
        self.rules[rule_id] = rule
        if len(self.rules) > MAX_RULES:
            raise self.fail(f"more than {MAX_RULES} rules after expanding repetitions", 0)

    def space(self, pos: int, newline_ok: bool) -> int:
        while True:
            c = self.at(pos)
            if c == "#":
                while self.at(pos) not in ("", "\r", "\n"):
                    pos += 1
            elif c in (" ", "\t") or (newline_ok and c in ("\r", "\n")):
                pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while _is_word_char(self.at(end)):
            end += 1
        if end == pos:
            raise self.fail("expecting name", pos)
        return end

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while self.at(end).isascii() and self.at(end).isdigit():
            end += 1
        if end == pos:
            raise self.fail("expecting integer", pos)
        return int(self.src[pos:end]), end

    def char(self, pos: int) -> tuple[int, int]:
        c = self.at(pos)
        if c == "\\":
            esc = self.at(pos + 1)
            sizes = {"x": 2, "u": 4, "U": 8}
            if esc in sizes:
                digits = self.src[pos + 2 : pos + 2 + sizes[esc]]
                if len(digits) != sizes[esc] or any(
                    d not in "0123456789abcdefABCDEF" for d in digits
                ):
                    raise self.fail(f"expecting {sizes[esc]} hex chars", pos)
                return int(digits, 16), pos + 2 + sizes[esc]
            simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
            if esc in simple:
                return simple[esc], pos + 2
            raise self.fail("unknown escape", pos)
        if c:
            return ord(c), pos + 1
        raise self.fail("unexpected end of input", pos)

    def alternates(self, pos: int, rule_name: str, rule_id: int, nested: bool) -> int:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail(f"parentheses nested deeper than {MAX_NESTING}", pos)
        rule: list[Element] = []
        pos = self.sequence(pos, rule_name, rule, nested)
        while self.at(pos) == "|":
            rule.append((ALT, 0))
            pos = self.space(pos + 1, True)
            pos = self.sequence(pos, rule_name, rule, nested)
        rule.append((END, 0))
        self.add_rule(rule_id, rule)
        self.depth -= 1
        return pos

    def sequence(self, pos: int, rule_name: str, rule: list[Element], nested: bool) -> int:
        last_sym_start = len(rule)
        n_prev_rules = 1

        def repeat(min_times: int, max_times: int | None) -> None:
            nonlocal n_prev_rules
            if last_sym_start == len(rule):
                raise self.fail("expecting preceding item to */+/?/{", pos)
            prev = rule[last_sym_start:]
            total = max_times if max_times else (min_times or 1)
            if n_prev_rules * total >= REPETITION_THRESHOLD:
                raise self.fail("too many repetitions of a complex item", pos)
            if min_times == 0:
                del rule[last_sym_start:]
            else:
                for _ in range(1, min_times):
                    rule.extend(prev)
            last_rec = 0
            n_opt = 1 if max_times is None else max_times - min_times
            for i in range(n_opt):
                rec = list(prev)
                rec_id = self.generate_symbol(rule_name)
                if i > 0 or max_times is None:
                    rec.append((REF, rec_id if max_times is None else last_rec))
                rec += [(ALT, 0), (END, 0)]
                self.add_rule(rec_id, rec)
                last_rec = rec_id
            if n_opt > 0:
                rule.append((REF, last_rec))
            n_prev_rules *= total

        while pos < len(self.src):
            c = self.src[pos]
            if c == '"':
                pos += 1
                last_sym_start, n_prev_rules = len(rule), 1
                while self.at(pos) != '"':
                    value, pos = self.char(pos)
                    rule.append((CHAR, value))
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                start_type = CHAR
                if self.at(pos) == "^":
                    pos += 1
                    start_type = CHAR_NOT
                last_sym_start, n_prev_rules = len(rule), 1
                while self.at(pos) != "]":
                    value, pos = self.char(pos)
                    rule.append((CHAR_ALT if last_sym_start < len(rule) else start_type, value))
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        upper, pos = self.char(pos + 1)
                        rule.append((CHAR_RNG_UPPER, upper))
                pos = self.space(pos + 1, nested)
            elif c in "<!":
                raise self.fail("token references (<...>) are not supported", pos)
            elif _is_word_char(c):
                end = self.name(pos)
                ref = self.symbol(self.src[pos:end])
                pos = self.space(end, nested)
                last_sym_start, n_prev_rules = len(rule), 1
                rule.append((REF, ref))
            elif c == "(":
                pos = self.space(pos + 1, True)
                before = len(self.symbol_ids)
                sub = self.generate_symbol(rule_name)
                pos = self.alternates(pos, rule_name, sub, True)
                n_prev_rules = max(1, len(self.symbol_ids) - before)
                last_sym_start = len(rule)
                rule.append((REF, sub))
                if self.at(pos) != ")":
                    raise self.fail("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last_sym_start, n_prev_rules = len(rule), 1
                rule.append((CHAR_ANY, 0))
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                pos = self.space(pos + 1, nested)
                repeat(*{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
            elif c == "{":
                pos = self.space(pos + 1, nested)
                min_times, pos = self.integer(pos)
                pos = self.space(pos, nested)
                max_times: int | None = None
                if self.at(pos) == "}":
                    max_times = min_times
                elif self.at(pos) == ",":
                    pos = self.space(pos + 1, nested)
                    if self.at(pos).isascii() and self.at(pos).isdigit():
                        max_times, pos = self.integer(pos)
                        pos = self.space(pos, nested)
                    if self.at(pos) != "}":
                        raise self.fail("expecting '}'", pos)
                else:
                    raise self.fail("expecting ','", pos)
                pos = self.space(pos + 1, nested)
                if min_times > REPETITION_THRESHOLD:
                    raise self.fail("too many repetitions", pos)
                if max_times is not None and max_times > REPETITION_THRESHOLD:
                    max_times = None
                # NOTE: llama.cpp computes max - min unsigned: {5,3} allocates until it dies.
                if max_times is not None and max_times < min_times:
                    raise self.fail("repetition maximum below its minimum", pos)
                repeat(min_times, max_times)
            else:
                break
        return pos

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.src[pos:end]
        pos = self.space(end, False)
        rule_id = self.symbol(name)
        if self.src[pos : pos + 3] != "::=":
            raise self.fail("expecting ::=", pos)
        pos = self.space(pos + 3, True)
        pos = self.alternates(pos, name, rule_id, False)
        if self.at(pos) == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif self.at(pos) == "\n":
            pos += 1
        elif self.at(pos):
            raise self.fail("expecting newline or end", pos)
        return self.space(pos, True)

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.src):
            pos = self.rule(pos)
        names = {v: k for k, v in self.symbol_ids.items()}
        for rule_id, name in names.items():
            if not self.rules.get(rule_id):
                raise GrammarError(f"invalid grammar: undefined rule {name!r}", param="grammar")


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


def parse(grammar: str) -> tuple[dict[int, list[Element]], dict[str, int]]:
    """(rules, symbol ids) as llama.cpp's parser builds them; raises GrammarError."""
    parser = _Parser(grammar)
    parser.parse()
    return parser.rules, parser.symbol_ids


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
    parser = _Parser(grammar)
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
