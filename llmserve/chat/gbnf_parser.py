"""A port of llama.cpp's GBNF parser (src/llama-grammar.cpp, llama_grammar_parser) that checks.

It builds the same rules llama.cpp would (same syntax, same rewriting of repetitions into
generated rules), raising GrammarError where llama.cpp fails, and where it would not fail but
should: a repetition maximum below its minimum (llama.cpp computes max - min unsigned and
allocates until the process dies) and parentheses nested deeper than MAX_NESTING (its recursive
descent overflows the C stack). chat/gbnf.py runs the remaining checks on the rules.
"""

from __future__ import annotations

from llmserve.errors import InvalidRequestError

# llama_gretype
END, ALT, REF, CHAR, CHAR_NOT, CHAR_RNG_UPPER, CHAR_ALT, CHAR_ANY = range(8)
Element = tuple[int, int]

MAX_NESTING = 64
MAX_RULES = 20_000
REPETITION_THRESHOLD = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD


class GrammarError(InvalidRequestError):
    """The grammar is invalid or outside what llama.cpp handles safely."""

    code = "invalid_grammar"


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


class Parser:
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


def parse(grammar: str) -> tuple[dict[int, list[Element]], dict[str, int]]:
    """(rules, symbol ids) as llama.cpp's parser builds them; raises GrammarError."""
    parser = Parser(grammar)
    parser.parse()
    return parser.rules, parser.symbol_ids
