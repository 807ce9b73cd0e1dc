"""A chat request's messages, tools, tool_choice and output constraints, checked up front.

`plan_chat` raises every 400 a chat request can earn before any engine work; `render_chat`
(on the engine thread, once the model is known) picks the template, renders the prompt and
says which tool-call parser and grammar the generation uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmserve.chat import constraints
from llmserve.chat.client_text import control_text, mark, segments
from llmserve.chat.constraints import SchemaError, ToolSpec
from llmserve.chat.custom_tools import as_function
from llmserve.chat.reasoning import template_variables
from llmserve.chat.system_turns import has_late_system, merge_system_turns
from llmserve.chat.templates import render, resolve_template, uses_tools
from llmserve.engine.base import ModelInfo
from llmserve.errors import InvalidRequestError
from llmserve.limits import check_text_fits
from llmserve.schemas import (
    FREEFORM_ARGUMENT,
    ChatCompletionRequest,
    ChatMessage,
    CustomToolDefinition,
    ToolDefinition,
)

logger = logging.getLogger(__name__)

ToolMode = Literal["none", "auto", "forced"]

GENERIC_TOOLS_PROMPT = (
    "You can call functions. Their signatures are given as JSON:\n{tools}\n\n"
    'To call functions, reply with only this JSON: {{"tool_calls": [{{"name": '
    '<function-name>, "arguments": <args-json-object>}}]}}'
)


@dataclass(frozen=True)
class ChatPlan:
    """What a chat request asks for, validated."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # rendered into the prompt
    specs: list[ToolSpec]  # every tool, with its arguments' Lark expression
    tool_mode: ToolMode
    forced: list[ToolSpec]  # tool_choice required (all) or named (one)
    parallel: bool
    content: str | None  # response_format as a Lark expression
    raw_grammar: str | None  # the grammar field, as an llguidance grammar
    variables: dict[str, Any] | None = None  # extra template variables (enable_thinking, ...)

    @property
    def needs_tool_template(self) -> bool:
        """Tools to render, or tool calls/results in the history."""
        return bool(self.tools) or any(
            m.get("tool_calls") or m["role"] == "tool" for m in self.messages
        )

    @property
    def constrains_answer(self) -> bool:
        """A grammar built for tool_choice or response_format: it matches the answer only."""
        return self.raw_grammar is None and (self.tool_mode == "forced" or bool(self.content))

    def parser_family(self, family: str) -> str | None:
        """The tool-call parser to run on the output (None: plain text)."""
        return family if self.tool_mode != "none" else None

    def grammar(self, family: str) -> str | None:
        """The llguidance grammar constraining the output for this template family, if any:
        auto tool calls without response_format are a lazy grammar (free text until the
        family's trigger)."""
        if self.raw_grammar is not None:
            return self.raw_grammar
        if self.tool_mode == "forced":
            expr, rules = constraints.tool_calls(family, self.forced, self.parallel)
            return constraints.grammar(expr, rules)
        if self.tool_mode == "auto" and self.content is None:
            return constraints.lazy_tool_calls(family, self.specs, self.parallel)
        if self.content is None:
            return None
        if self.tool_mode == "auto":
            expr, rules = constraints.tool_calls(family, self.specs, self.parallel)
            return constraints.grammar(f"content | {expr}", {"content": self.content, **rules})
        return constraints.grammar("content", {"content": self.content})


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the dicts HF chat templates expect: content a string, arguments parsed."""
    out: list[dict[str, Any]] = []
    open_ids: set[str] | None = None  # ids of the calls tool messages may answer now
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.reasoning_content is not None and role == "assistant":
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            d["tool_calls"] = [_call_dict(i, j, tc) for j, tc in enumerate(m.tool_calls)]
            open_ids = {tc.id for tc in m.tool_calls}
        elif role == "tool":
            if open_ids is None:
                raise InvalidRequestError(
                    f"messages[{i}] has role 'tool' but does not follow an assistant message "
                    "with tool_calls", param=f"messages.{i}",
                )
            known = open_ids - {""}
            if m.tool_call_id is not None and known and m.tool_call_id not in known:
                raise InvalidRequestError(
                    f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no call of the "
                    f"preceding assistant message (ids: {', '.join(sorted(known))})",
                    param=f"messages.{i}.tool_call_id",
                )
            d["tool_call_id"] = m.tool_call_id
        elif role != "function":
            open_ids = None
        out.append(d)
    return out


def _call_dict(i: int, j: int, tc: Any) -> dict[str, Any]:
    try:
        arguments = json.loads(tc.function.arguments or "{}")
    except ValueError as exc:
        raise InvalidRequestError(
            f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
            param=f"messages.{i}.tool_calls.{j}.function.arguments",
        ) from exc
    return {"id": tc.id, "type": "function",
            "function": {"name": tc.function.name, "arguments": arguments}}


def _tool_spec(i: int, tool: ToolDefinition | CustomToolDefinition) -> ToolSpec:
    if isinstance(tool, CustomToolDefinition):
        spec = tool.custom
        text = constraints.custom_input_schema(spec.format, f"tools.{i}.custom.format")
        schema: dict[str, Any] | None = {
            "type": "object", "properties": {FREEFORM_ARGUMENT: text},
            "required": [FREEFORM_ARGUMENT], "additionalProperties": False}
        name = spec.name
    else:
        name, schema = tool.function.name, tool.function.parameters
    param = f"tools.{i}.function.parameters"
    if schema is None:
        return ToolSpec(name, '"{}"')
    if schema.get("type", "object") != "object":
        raise SchemaError(f"tools[{i}].function.parameters must be an object schema", param=param)
    return ToolSpec(name, constraints.schema_expr(schema, param))


def _content_rules(req: ChatCompletionRequest) -> str | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return constraints.JSON_OBJECT
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise InvalidRequestError(
            "response_format json_schema needs json_schema.schema",
            param="response_format.json_schema",
        )
    return constraints.schema_expr(fmt.json_schema.json_schema, "response_format.json_schema")


def check_messages(req: ChatCompletionRequest, most: int) -> None:
    """400 past --max_messages, before any other work on the request."""
    # NOTE: rendering and tokenizing cost grows with the message count (100k messages
    # held the engine thread for minutes); --max_messages bounds it before any work.
    if len(req.messages) > most:
        raise InvalidRequestError(
            f"{len(req.messages)} messages; at most {most} per request (--max_messages)",
            param="messages",
        )


def plan_chat(req: ChatCompletionRequest) -> ChatPlan:
    """Validate a chat request's messages, tools, tool_choice and output format (400s)."""
    messages = message_dicts(req.messages)
    # NOTE: custom tools are offered (and forced, and parsed) as their freeform functions
    tools = [as_function(t.custom) if isinstance(t, CustomToolDefinition) else t
             for t in req.tools or []]
    names = [t.function.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"duplicate tool names: {', '.join(dupes)}", param="tools")
    specs = [_tool_spec(i, t) for i, t in enumerate(req.tools or [])]
    choice = req.tool_choice or ("auto" if tools else "none")
    forced: list[ToolSpec] = []
    mode: ToolMode = "none" if choice == "none" or not tools else "auto"
    if choice == "required":
        forced, mode = specs, "forced"
    elif not isinstance(choice, str):
        forced = [s for s in specs if s.name == choice.function.name]
        mode = "forced"
        if not forced:
            raise InvalidRequestError(
                f"tool_choice names function {choice.function.name!r}, which is not in tools"
                f" ({', '.join(names) or 'none given'})", param="tool_choice",
            )
    if mode == "forced" and not tools:
        raise InvalidRequestError("tool_choice requires tools", param="tool_choice")
    content = _content_rules(req)
    try:
        variables = template_variables(
            req.chat_template_kwargs, req.reasoning_effort, req.thinking_enabled()
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="chat_template_kwargs") from exc
    raw_grammar = None
    if req.grammar is not None:
        raw_grammar = constraints.gbnf(req.grammar)
        if content is not None or mode == "forced":
            raise InvalidRequestError(
                "grammar cannot be combined with response_format or a forced tool_choice",
                param="grammar",
            )
    return ChatPlan(
        messages=messages,
        tools=[t.model_dump(exclude_none=True) for t in tools] if mode != "none" else None,
        # NOTE: a named tool_choice means one call to that function.
        specs=specs, tool_mode=mode, forced=forced,
        parallel=req.parallel_tool_calls is True and isinstance(choice, str),
        content=content, raw_grammar=raw_grammar, variables=variables,
    )


@dataclass(frozen=True)
class RenderedChat:
    """The prompt text, the template it came from, and the tool-call family it implies."""

    text: str
    origin: str
    family: str
    # The text cut into (piece, is_client): client pieces are tokenized as plain text.
    segments: tuple[tuple[str, bool], ...] = ()

    def pieces(self) -> tuple[tuple[str, bool], ...]:
        """What to tokenize: the segments, or the whole text as markup."""
        return self.segments or ((self.text, False),)


def extended(rendered: RenderedChat, text: str) -> RenderedChat:
    """rendered with its text replaced by text: the text with trailing whitespace stripped,
    then more markup (chat/reasoning.answer_only closing a `<think>`); client pieces kept."""
    if text == rendered.text:
        return rendered
    base = rendered.text.rstrip()
    if not text.startswith(base):
        raise ValueError("the new prompt must extend the rendered one")
    if not rendered.segments:
        return dataclasses.replace(rendered, text=text)
    segments = list(rendered.segments)
    cut = len(rendered.text) - len(base)
    while cut and segments:
        piece, client = segments[-1]
        if len(piece) <= cut:
            segments.pop()
            cut -= len(piece)
        else:
            segments[-1] = (piece[: len(piece) - cut], client)
            cut = 0
    segments.append((text[len(base):], False))
    return dataclasses.replace(rendered, text=text, segments=tuple(segments))


def render_chat(
    info: ModelInfo, plan: ChatPlan, templates_dir: Path, override: str | None
) -> RenderedChat:
    """Render the plan's messages with the model's template (on the engine thread)."""
    template = resolve_template(info, templates_dir, override, tools=plan.needs_tool_template)
    messages, tools, family = plan.messages, plan.tools, template.family
    if plan.needs_tool_template and not uses_tools(template.source):
        # NOTE: no tool-capable template of this family: describe tools in a system message
        # and write calls and results as plain text the generic JSON parser reads back.
        logger.info("%s does not render tools; describing them in a system message",
                    template.origin)
        messages, tools, family = _generic_messages(plan.messages, plan.tools), None, "json"
    def run(msgs: list[dict[str, Any]], tool_list: list[dict[str, Any]] | None) -> str:
        return render(
            template.source, msgs, bos_token=info.bos_token, eos_token=info.eos_token,
            add_generation_prompt=True, tools=tool_list, variables=plan.variables,
        )

    try:
        text = run(messages, tools)
    except InvalidRequestError:
        if not has_late_system(messages):
            raise
        # NOTE: the template refuses a system message after the first (raise_exception):
        # merge those into user turns (chat/system_turns.py) rather than fail the request.
        logger.debug("%s refuses late system messages; merging them into user turns",
                     template.origin)
        messages = merge_system_turns(messages)
        text = run(messages, tools)
    check_text_fits(text, info, "messages")
    control = control_text(info.control_tokens)
    marked_messages, in_messages = mark(messages, control)
    marked_tools, in_tools = mark(tools, control)
    if not (in_messages or in_tools):
        return RenderedChat(text, template.origin, family)
    # NOTE: client text holds control-token text: render again with it marked (rare)
    spans = segments(run(marked_messages, marked_tools), text)
    return RenderedChat(text, template.origin, family, tuple(spans))


def _generic_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif m["role"] == "tool":
            out.append({"role": "user",
                        "content": f"Result of call {m.get('tool_call_id') or ''}: {m['content']}"})
        else:
            out.append(m)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = GENERIC_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
