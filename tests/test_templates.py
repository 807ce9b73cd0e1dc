"""Chat templates: resolution order, the sandbox, shipped templates vs plain jinja2, and the
tool calls each template writes being read back by its family's parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from llmserve.chat.plan import plan_chat, render_chat
from llmserve.chat.templates import (
    SHIPPED_TEMPLATES,
    NoTemplateError,
    TemplateRenderError,
    _tojson,
    render,
    resolve_template,
    uses_tools,
)
from llmserve.chat.tools import ToolCallDelta, make_parser
from llmserve.engine.base import ModelInfo
from llmserve.errors import InvalidRequestError
from llmserve.schemas import ChatCompletionRequest
from tests.conftest import SMOL, require_model

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "21 °C."},
    {"role": "user", "content": "Thanks!"},
]
SHIPPED = {"chatml": "hermes", "gemma": "hermes", "llama3": "llama3", "mistral": "mistral"}
END_OF_TURN = {"chatml": "<|im_end|>\n", "gemma": "<end_of_turn>\n", "llama3": "<|eot_id|>",
               "mistral": "</s>"}


def plain_render(source: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    """The reference: jinja2 without a sandbox, configured like transformers."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    return env.from_string(source).render(messages=messages, **kw)


def info(**kw: Any) -> ModelInfo:
    base: dict[str, Any] = {"name": "m.gguf", "path": "m.gguf", "n_ctx": 2048,
                            "bos_token": "<s>", "eos_token": "</s>"}
    return ModelInfo(**{**base, **kw})


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_templates_equal_plain_jinja(name: str) -> None:
    source = (SHIPPED_TEMPLATES / f"{name}.jinja").read_text()
    kw = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True}
    for tools in (TOOLS, None):
        ours = render(source, CONVERSATION, tools=tools, **kw)
        assert ours == plain_render(source, CONVERSATION, tools=tools, **kw)
        assert ("Weather for a city" in ours) == (tools is not None)
    assert uses_tools(source)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_template_writes_calls_its_parser_reads(name: str) -> None:
    """The assistant turn a template renders for a tool call parses back to that call."""
    source = (SHIPPED_TEMPLATES / f"{name}.jinja").read_text()
    kw = {"bos_token": "<s>", "eos_token": "</s>", "tools": TOOLS}
    before = render(source, CONVERSATION[:2], add_generation_prompt=True, **kw)
    with_call = render(source, CONVERSATION[:3], add_generation_prompt=False, **kw)
    assert with_call.startswith(before)
    reply = with_call[len(before) :]
    assert reply.endswith(END_OF_TURN[name])
    parser = make_parser(SHIPPED[name])
    pieces = parser.feed(reply[: -len(END_OF_TURN[name])]) + parser.finish()
    deltas = [p for p in pieces if isinstance(p, ToolCallDelta)]
    assert [p for p in pieces if isinstance(p, str)] == []
    assert deltas[0].name == "get_weather"
    assert json.loads("".join(d.arguments for d in deltas)) == {"city": "Zürich"}


@pytest.mark.real_model
def test_gguf_template_equals_plain_jinja() -> None:
    from llmserve.config import Settings
    from llmserve.engine.llama import LlamaEngine

    engine = LlamaEngine.load(require_model(SMOL), Settings(n_ctx=256))
    try:
        source = engine.info.chat_template
    finally:
        engine.close()
    assert source and "<|im_start|>" in source
    messages = [m for m in CONVERSATION if m["role"] in ("system", "user", "assistant")
                and not m.get("tool_calls")]
    for msgs in (messages, messages[1:]):  # with and without a system message
        kw = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "add_generation_prompt": True}
        ours = render(source, msgs, **kw)
        assert ours == plain_render(source, msgs, **kw)
        assert ours.endswith("<|im_start|>assistant\n")
    assert not uses_tools(source)


def test_resolution_order(tmp_path: Path) -> None:
    gguf = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
    model = info(chat_template=gguf, name="tiny.gguf")
    assert resolve_template(model, tmp_path).origin == "gguf"
    # with tools, a ChatML template that ignores them gives way to templates/chatml.jinja
    assert resolve_template(model, tmp_path, tools=True).origin.endswith("chatml.jinja")
    (tmp_path / "tiny.jinja").write_text("{{ 'stem' }}")
    assert resolve_template(model, tmp_path).source == "{{ 'stem' }}"
    assert resolve_template(model, tmp_path, "gemma").origin.endswith("gemma.jinja")
    assert resolve_template(model, tmp_path, "llama3.jinja").family == "llama3"
    assert resolve_template(model, tmp_path, "{{ 'inline' }}").origin == "--chat_template"
    (tmp_path / "mine.txt").write_text("{{ 'file' }}")
    assert resolve_template(model, tmp_path, str(tmp_path / "mine.txt")).source == "{{ 'file' }}"
    with pytest.raises(NoTemplateError):
        resolve_template(model, tmp_path, "no-such-template")
    gemma = info(architecture="gemma3", name="g.gguf")
    assert resolve_template(gemma, tmp_path).origin.endswith("gemma.jinja")
    with pytest.raises(NoTemplateError) as err:
        resolve_template(info(name="bare.gguf"), tmp_path)
    assert err.value.status == 400 and "bare.jinja" in err.value.message


def test_unknown_template_without_tools_gets_generic_tool_prompt(tmp_path: Path) -> None:
    source = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    req = ChatCompletionRequest(messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
    ], tools=TOOLS)
    out = render_chat(info(chat_template=source), plan_chat(req), tmp_path, None)
    assert out.family == "json"
    assert out.text.startswith("[system] You can call functions.")
    assert '[assistant] {"tool_calls": [{"name": "get_weather"' in out.text
    assert "[user] Result of call c1: cold" in out.text


MALICIOUS = [
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{% set x = namespace() %}{{ x.__class__.__init__.__globals__['sys'].exit(1) }}",
]


@pytest.mark.parametrize("template", MALICIOUS)
def test_sandbox_blocks_code(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = template.replace("{marker}", str(marker))
    with pytest.raises((TemplateRenderError, InvalidRequestError)) as info_:
        render(source, [{"role": "user", "content": "hi"}], bos_token="", eos_token="")
    assert info_.value.status in (400, 500)
    assert not marker.exists()


def test_unsafe_attributes_render_as_nothing() -> None:
    for source in ("{{ raise_exception.__globals__ }}", "{{ strftime_now.__code__ }}"):
        assert render(source, [], bos_token="", eos_token="") == ""


def test_template_errors_fail_the_request() -> None:
    with pytest.raises(InvalidRequestError):
        render("{{ raise_exception('roles must alternate') }}", [], bos_token="", eos_token="")
    with pytest.raises(InvalidRequestError):
        render("{% if %}", [], bos_token="", eos_token="")
    with pytest.raises(TemplateRenderError):
        render("{{ messages[0]['content'] + 1 }}", [{"content": "x"}], bos_token="",
               eos_token="")
