"""System messages after the first: kept where the template allows them, merged into user turns
where it raises (chat/system_turns.py, chat/plan.render_chat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmserve.chat.plan import plan_chat, render_chat
from llmserve.chat.system_turns import merge_system_turns
from llmserve.engine.base import ModelInfo
from llmserve.engine.fake import CHATML
from llmserve.errors import InvalidRequestError
from llmserve.schemas import ChatCompletionRequest

# Like many GGUF templates (Gemma's, Mistral's, Llama 2's): a system message only first.
STRICT = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}"
    "{% set loop_messages = messages %}{% endif %}[SYS]{{ sys }}\n"
    "{% for m in loop_messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported here') }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def msg(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


def render(messages: list[dict[str, Any]], template: str, tmp_path: Path) -> str:
    info = ModelInfo(name="m.gguf", path="m.gguf", n_ctx=4096, chat_template=template,
                     bos_token="<s>", eos_token="</s>")
    plan = plan_chat(ChatCompletionRequest(messages=messages))
    return render_chat(info, plan, tmp_path, None).text


def test_merge_appends_to_the_user_message_before() -> None:
    merged = merge_system_turns([msg("system", "S"), msg("user", "u1"), msg("system", "env"),
                                 msg("assistant", "a"), msg("system", "late"),
                                 msg("user", "u2")])
    assert merged == [msg("system", "S"), msg("user", "u1\n\nenv\n\nlate"), msg("assistant", "a"),
                      msg("user", "u2")]


def test_merge_prepends_to_the_next_user_message_when_none_is_before() -> None:
    merged = merge_system_turns([msg("system", "S"), msg("system", "T"), msg("assistant", "a"),
                                 msg("system", "U"), msg("user", "u")])
    assert merged == [msg("system", "S"), msg("assistant", "a"), msg("user", "T\n\nU\n\nu")]
    assert merge_system_turns([msg("system", "S"), msg("system", "T")]) == [
        msg("system", "S"), msg("user", "T")]
    # a leading system message is never moved; nothing else to merge leaves the list alone
    plain = [msg("system", "S"), msg("user", "u")]
    assert merge_system_turns(plain) == plain


def test_a_template_that_allows_late_system_messages_renders_them_in_place(tmp_path: Path
                                                                           ) -> None:
    text = render([msg("user", "hi"), msg("system", "env")], CHATML, tmp_path)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\nenv<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_a_template_that_raises_gets_them_merged(tmp_path: Path) -> None:
    text = render([msg("system", "S"), msg("user", "hi"), msg("system", "env")], STRICT, tmp_path)
    assert text == "[SYS]S\n[user]hi\n\nenv\n[assistant]"


def test_merged_prompts_keep_their_prefix_across_an_agents_turns(tmp_path: Path) -> None:
    # Claude Code: [user, system] first, then the tool round trip appended after them
    first = [msg("system", "S"), msg("user", "read hello.py"), msg("system", "# Environment")]
    call = {"role": "assistant", "content": "", "tool_calls": [{
        "id": "t1", "type": "function", "function": {"name": "Read", "arguments": "{}"}}]}
    second = [*first, call, {"role": "tool", "tool_call_id": "t1", "content": "print(1)"},
              msg("system", "reminder")]
    one = render(first, STRICT, tmp_path)
    two = render(second, STRICT, tmp_path)
    assert two.startswith(one.removesuffix("[assistant]"))
    assert "reminder" in two


def test_other_template_errors_still_fail(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="System role not supported"):
        render([msg("user", "a"), msg("user", "b")],
               "{{ raise_exception('System role not supported here') }}", tmp_path)


def test_merge_appends_to_a_tool_result_before() -> None:
    result = {"role": "tool", "tool_call_id": "t1", "content": "print(1)"}
    merged = merge_system_turns([msg("user", "u"), msg("assistant", "a"), result,
                                 msg("system", "reminder")])
    assert merged[:2] == [msg("user", "u"), msg("assistant", "a")]
    assert merged[2] == {**result, "content": "print(1)\n\nreminder"} and len(merged) == 3
