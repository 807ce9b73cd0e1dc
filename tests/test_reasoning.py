"""chat/reasoning.py: the splitter on every split of scripted replies, the setup from the
prompt, and the template variables a request sets."""

from __future__ import annotations

import itertools

import pytest

from llmserve.chat.reasoning import (
    ReasoningSetup,
    ReasoningSplitter,
    setup_for,
    template_variables,
)

HARMONY = ("<|channel|>analysis<|message|>Let me think. 2 + 2 = 4.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>The answer is 4.")
CASES = [
    # (output, setup, reasoning, content)
    ("<think>\nI think so.\n</think>\n\nYes.", None, "I think so.", "Yes."),
    ("  <think>a  b</think>x <think>y</think>", None, "a  b", "x <think>y</think>"),
    ("No tags <think>here</think>.", None, "", "No tags <think>here</think>."),
    ("\n <thin", None, "", "\n <thin"),
    ("\n\nplain < text", None, "", "\n\nplain < text"),
    ("<think>never closed \n", None, "never closed", ""),
    ("inside already\n</think>\nanswer", ReasoningSetup("think"), "inside already", "answer"),
    (HARMONY, None, "Let me think. 2 + 2 = 4.", "The answer is 4."),
    # <|end|> renders empty where llama.cpp treats it as a control token
    (HARMONY.replace("<|end|>", ""), None, "Let me think. 2 + 2 = 4.", "The answer is 4."),
    ("ponder<|end|><|start|>assistant<|channel|>final<|message|>Done.",
     ReasoningSetup("harmony"), "ponder", "Done."),
    ("<|channel|>analysis<|message|>need weather<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}', None,
     "need weather", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ("<|channel|>final<|message|>Just this.", None, "", "Just this."),
    ("<|start|>assistant<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>"
     "final<|message|>b", None, "a", "b"),
]


def split(pieces: list[str], setup: ReasoningSetup | None = None) -> tuple[str, str]:
    splitter = ReasoningSplitter(setup)
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.finish()
    assert all(text for _, text in parts)
    return ("".join(t for thinking, t in parts if thinking),
            "".join(t for thinking, t in parts if not thinking))


@pytest.mark.parametrize(("output", "setup", "reasoning", "content"), CASES)
def test_every_split_gives_the_same_parts(
    output: str, setup: ReasoningSetup | None, reasoning: str, content: str
) -> None:
    assert split([output], setup) == (reasoning, content)
    assert split(list(output), setup) == (reasoning, content)
    for i, j in itertools.combinations(range(1, len(output)), 2):
        pieces = [output[:i], output[i:j], output[j:]]
        assert split(pieces, setup) == (reasoning, content), pieces


def test_reasoning_streams_before_the_close_tag() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<think>") == []
    assert splitter.thinking
    assert splitter.feed("step one ") == [(True, "step one")]
    assert splitter.feed("</th") == []  # held: maybe the close tag
    assert splitter.feed("ink>\n\nok") == [(False, "ok")]
    assert not splitter.thinking and splitter.blocks == 1


def test_setup_from_the_prompt() -> None:
    assert setup_for("<|im_start|>assistant\n", "none") is None
    assert setup_for("<|im_start|>assistant\n", "auto") == ReasoningSetup()
    assert setup_for("<\uff5cAssistant\uff5c><think>\n", "deepseek") == ReasoningSetup("think")
    assert setup_for("<think>\n\n</think>\n\n", "auto") == ReasoningSetup()  # thinking off
    assert setup_for("<|start|>assistant<|channel|>analysis<|message|>", "auto") == (
        ReasoningSetup("harmony"))


def test_template_variables() -> None:
    assert template_variables(None, None, None) == {}
    assert template_variables(None, "high", None) == {"reasoning_effort": "high"}
    assert template_variables(None, "none", None) == {
        "reasoning_effort": "none", "enable_thinking": False, "thinking": False}
    assert template_variables({"enable_thinking": True, "x": [1]}, None, False) == {
        "enable_thinking": True, "thinking": False, "x": [1]}
    with pytest.raises(ValueError, match="messages"):
        template_variables({"messages": []}, None, None)
