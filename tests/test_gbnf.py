"""GBNF checks (chat/gbnf.py): what llama.cpp accepts, and the grammars that would crash it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llmserve.chat import gbnf
from tests.conftest import SMOL, require_model
from tests.gbnf_recognizer import accepts

VALID = [
    'root ::= "yes" | "no"',
    'root ::= [a-z]+ # comment\n',
    'root ::= ("a"?)*',
    'root ::= ( "a"\n | "b" )',
    'root::="a"',
    'root ::= [^"\\\\]*',
    'root ::= "a"{0}',
    'root ::= "a"{2,} "b"{0,3} "c"{2}',
    'root ::= ("a" | "b"){30}{30}',
    'root ::= a-b\na-b ::= "x"',
    'root ::= "a" | ',
    'root ::= "\\U0001F600" [à-ÿ] "\\x41\\u00e9"',
    'root ::= x\r\nx ::= . .',
    'root ::= "a"\nroot ::= "b"',
]

# Rejected by llama.cpp's own parser too (it returns NULL: safe, but must be a 400 for us).
PARSE_ERRORS = [
    'root ::= "a',
    "root ::= foo",
    'x ::= "a"',
    'root ::= root "a"',
    'root ::= x\nx ::= "a" | x "b"',
    'root ::= "a"{5000}',
    'root ::= "a"{,3}',
    'root ::= "a"{3',
    'root ::= "a"\n | "b"',
    'root ::= "\\q"',
    'root ::= "\\x4"',
    "root ::= *",
    'root ::= ""*',
    'root ::= "a" )',
    'root ::= ("a"',
    "root ::= é",
]

# Each of these crashed or hung the process when handed to llama.cpp (see gbnf's docstring).
CRASHES = {
    "deep-nesting": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000,
    "max-below-min": 'root ::= "a"{5,3}',
    "nul-char": 'root ::= "\\x00"',
    "beyond-unicode": "root ::= [\\U00300000]",
    "negated-everything": "root ::= [^\\x01-\\U0010FFFF]",
    "reversed-range-only": "root ::= [z-a]",
    "nul-in-text": 'root ::= "a"\0',
    # NOTE: 16 levels took llama.cpp 6 s to set up, 18 levels 273 s (both on the engine thread).
    "exponential-start": "root ::= a0\n" + "".join(
        f"a{i} ::= a{i + 1} | a{i + 1} \"x\"\n" for i in range(16)
    ) + 'a16 ::= "y"\n',
    "exponential-left-walk": "root ::= a0\n" + "".join(
        f"a{i} ::= a{i + 1} \"x\" | a{i + 1} \"z\"\n" for i in range(40)
    ) + 'a40 ::= "y"\n',
}


@pytest.mark.parametrize("grammar", VALID)
def test_valid_grammars_pass(grammar: str) -> None:
    gbnf.validate(grammar)


@pytest.mark.parametrize("grammar", PARSE_ERRORS)
def test_parse_errors_are_400(grammar: str) -> None:
    with pytest.raises(gbnf.GrammarError) as info:
        gbnf.validate(grammar)
    assert info.value.status == 400
    assert info.value.param == "grammar"


@pytest.mark.parametrize("grammar", CRASHES.values(), ids=CRASHES.keys())
def test_grammars_that_crash_llama_cpp_are_rejected(grammar: str) -> None:
    with pytest.raises(gbnf.GrammarError):
        gbnf.validate(grammar)


def test_token_references_and_size_limits() -> None:
    for grammar in ("root ::= <[42]>", "root ::= !<|im_end|>", "", "root ::= " + "a" * 300_000):
        with pytest.raises(gbnf.GrammarError):
            gbnf.validate(grammar)


def test_recognizer_follows_the_grammar() -> None:
    grammar = 'root ::= "{" pair ("," pair)* "}"\npair ::= [a-z]+ ":" [0-9]{1,3}\n'
    gbnf.validate(grammar)
    assert accepts(grammar, "{a:1,bc:234}")
    assert not accepts(grammar, "{a:1234}")
    assert not accepts(grammar, "{a:1,}")
    assert not accepts(grammar, "{A:1}")


@pytest.mark.real_model
def test_llama_cpp_agrees(tmp_path: Path) -> None:
    """Every grammar we accept, llama.cpp parses; the parse errors are errors there too."""
    from llmserve.config import Settings
    from llmserve.engine.llama import LlamaEngine
    from llmserve.errors import InvalidRequestError

    engine = LlamaEngine.load(require_model(SMOL), Settings(n_ctx=256))
    try:
        for grammar in VALID:
            engine._grammar(grammar).close()
        for grammar in PARSE_ERRORS:
            with pytest.raises(InvalidRequestError):
                engine._grammar(grammar)
    finally:
        engine.close()


def test_random_text_is_valid_or_400() -> None:
    rng = random.Random(1)
    pieces = ["root", " ::= ", "::=", '"a"', '"', "[", "]", "^", "-", "(", ")", "|", "*", "+",
              "?", "{", "}", ",", "1", "2", "0", "\\", "x", "u", "\n", " ", "#", "b", "a-b", ".",
              "\\x00", "\\U0010FFFF", "é", "<", "!", "\r"]
    valid = 0
    for _ in range(5000):
        grammar = "root ::= " + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        try:
            gbnf.validate(grammar)
            valid += 1
        except gbnf.GrammarError:
            pass
    assert valid > 10
