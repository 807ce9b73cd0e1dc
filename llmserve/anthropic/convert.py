"""Anthropic Messages requests as our chat requests: system, content blocks, tools, tool_choice,
sampling; the cache_control breakpoints; and our finish reasons as Anthropic stop reasons.

Decisions where Anthropic's format has no one-to-one counterpart:
- text blocks of one message (and system blocks) are joined with a newline;
- a tool_result becomes a `tool` message (is_error: its text prefixed with "Error: "), so the
  model's own template renders it; its tool_use_id must answer a tool_use of the message before;
- thinking blocks sent back in the history are dropped from the prompt;
- a final assistant message is a prefill: the reply continues it (see `Converted.prefill`);
- system entries inside `messages` (Claude Code sends them) stay system messages where they
  stand; templates that refuse them get them merged into a user turn (chat/system_turns.py);
- server tools (any `type` but custom) are left out of the prompt, with a warning
  (`Converted.warnings`, sent as `Warning` headers);
- Claude Code's billing block (a system text block starting `x-anthropic-billing-header:`,
  with a per-request `cch=` nonce in some modes) is left out, so it never costs a cache miss.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from llmserve.anthropic.schemas import (
    CacheControl,
    CountTokensRequest,
    MessageParam,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from llmserve.errors import InvalidRequestError
from llmserve.output import Finished
from llmserve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    ToolCall,
    ToolCallFunction,
    ToolDefinition,
)

logger = logging.getLogger(__name__)

MAX_BREAKPOINTS = 4  # as Anthropic
BILLING_PREFIX = "x-anthropic-billing-header:"


@dataclass(frozen=True)
class Converted:
    """A Messages request as a chat request, and the prefix its furthest breakpoint pins."""

    chat: ChatCompletionRequest
    prefill: str  # text of a final assistant message: the reply continues it
    pin: ChatCompletionRequest | None  # the conversation cut right after the breakpoint
    pin_seconds: float
    warnings: tuple[str, ...] = field(default=())  # what was left out, for Warning headers


def _blocks(m: MessageParam) -> list[Any]:
    return [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content


def _system_text(blocks: list[TextBlock]) -> str:
    # NOTE: Claude Code's billing block changes per version and, with a `cch=` nonce, per
    # request: kept, it would end the cached prefix at the very first system block.
    return "\n".join(b.text for b in blocks if not b.text.lstrip().startswith(BILLING_PREFIX))


def _system(req: CountTokensRequest, upto: int | None = None) -> ChatMessage | None:
    if req.system is None:
        return None
    if isinstance(req.system, str):
        text = _system_text([TextBlock(type="text", text=req.system)])
    else:
        text = _system_text(req.system if upto is None else req.system[: upto + 1])
    return ChatMessage(role="system", content=text) if text else None


def _system_entry(i: int, blocks: list[Any]) -> ChatMessage | None:
    """A system entry inside messages: text blocks only."""
    for j, b in enumerate(blocks):
        if not isinstance(b, TextBlock):
            raise InvalidRequestError(
                f"messages.{i}.content.{j}: system messages take text blocks only",
                param=f"messages.{i}.content.{j}",
            )
    text = _system_text(blocks)
    return ChatMessage(role="system", content=text) if text else None


def _assistant(i: int, blocks: list[Any]) -> ChatMessage:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ToolUseBlock):
            arguments = json.dumps(b.input, ensure_ascii=False)
            calls.append(ToolCall(id=b.id, function=ToolCallFunction(name=b.name,
                                                                      arguments=arguments)))
        elif isinstance(b, ToolResultBlock):
            raise InvalidRequestError(
                f"messages.{i}.content.{j}: tool_result blocks belong in user messages",
                param=f"messages.{i}.content.{j}",
            )
    return ChatMessage(role="assistant", content="\n".join(texts), tool_calls=calls or None)


def _user(i: int, blocks: list[Any], open_ids: set[str]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    texts: list[str] = []
    for j, b in enumerate(blocks):
        where = f"messages.{i}.content.{j}"
        if isinstance(b, ToolResultBlock):
            if texts:
                raise InvalidRequestError(
                    f"{where}: tool_result blocks must come before any text in a user message",
                    param=where,
                )
            if b.tool_use_id not in open_ids:
                known = ", ".join(sorted(open_ids)) or "none"
                raise InvalidRequestError(
                    f"{where}.tool_use_id {b.tool_use_id!r} answers no tool_use block of the "
                    f"previous assistant message (ids: {known})", param=f"{where}.tool_use_id",
                )
            prefix = "Error: " if b.is_error else ""
            out.append(ChatMessage(role="tool", tool_call_id=b.tool_use_id,
                                   content=prefix + b.text()))
        elif isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ToolUseBlock):
            raise InvalidRequestError(f"{where}: tool_use blocks belong in assistant messages",
                                      param=where)
    if texts or not out:
        out.append(ChatMessage(role="user", content="\n".join(texts)))
    return out


def _messages(
    req: CountTokensRequest, messages: list[MessageParam], system_upto: int | None = None
) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    system = _system(req, system_upto)
    if system is not None:
        out.append(system)
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        blocks = [b for b in _blocks(m) if not isinstance(b, ThinkingBlock)]
        if m.role == "assistant":
            msg = _assistant(i, blocks)
            open_ids = {c.id for c in msg.tool_calls or []}
            out.append(msg)
        elif m.role == "system":
            entry = _system_entry(i, blocks)
            if entry is not None:
                out.append(entry)
        else:
            out.extend(_user(i, blocks, open_ids))
            open_ids = set()
    return out


def _tools(req: CountTokensRequest, upto: int | None = None) -> list[ToolDefinition] | None:
    if not req.tools:
        return None
    tools = req.tools if upto is None else req.tools[: upto + 1]
    return [ToolDefinition(type="function", function=FunctionDefinition(
        name=t.name, description=t.description, parameters=t.input_schema))
        for t in tools if isinstance(t, Tool)] or None


def dropped_tools(req: CountTokensRequest) -> list[str]:
    """A warning for each server tool left out of the prompt."""
    out: list[str] = []
    for i, tool in enumerate(req.tools or []):
        if not isinstance(tool, Tool):
            # NOTE: the type goes into a header: keep it to header-safe characters.
            kind = re.sub(r"[^A-Za-z0-9_.-]", "?", tool.type)[:64]
            out.append(f"tools.{i} ({kind}) is a server tool llmserve cannot run; "
                       "left out of the prompt")
    return out


def _tool_choice(req: CountTokensRequest) -> tuple[Any, bool]:
    """Our tool_choice and parallel_tool_calls."""
    choice = req.tool_choice
    if choice is None:
        return None, True
    if isinstance(choice, ToolChoiceNone):
        return "none", True
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    if isinstance(choice, ToolChoiceTool):
        return NamedToolChoice(function=FunctionName(name=choice.name)), False
    return "auto", parallel


def _breakpoints(req: CountTokensRequest) -> list[tuple[tuple[int, ...], CacheControl]]:
    """Every cache_control, in prompt order: (0, tool), (1, system block), (2, message, block)."""
    found: list[tuple[tuple[int, ...], CacheControl]] = []
    for k, tool in enumerate(req.tools or []):
        if tool.cache_control is not None:
            found.append(((0, k), tool.cache_control))
    for k, block in enumerate(req.system if isinstance(req.system, list) else []):
        if block.cache_control is not None:
            found.append(((1, k), block.cache_control))
    for i, m in enumerate(req.messages):
        for j, b in enumerate(_blocks(m)):
            mark = b.breakpoint() if isinstance(b, ToolResultBlock) else b.cache_control
            if mark is not None:
                found.append(((2, i, j), mark))
    if len(found) > MAX_BREAKPOINTS:
        raise InvalidRequestError(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(found)}.", param="cache_control",
        )
    if req.cache_control is not None:  # automatic caching: the whole conversation
        last = len(req.messages) - 1
        found.append(((2, last, len(_blocks(req.messages[last])) - 1), req.cache_control))
    return found


def _cut(req: CountTokensRequest, where: tuple[int, ...], base: ChatCompletionRequest
         ) -> ChatCompletionRequest:
    """The conversation up to and including the block at `where` (the prefix to pin)."""
    choice: Literal["none", "auto"] = "none" if base.tool_choice == "none" else "auto"
    if where[0] == 0:
        messages = [ChatMessage(role="user", content="")]
        tools = _tools(req, where[1])
        return ChatCompletionRequest(messages=messages, tools=tools,
                                     tool_choice=choice if tools else None)
    if where[0] == 1:
        messages = _messages(req, [], system_upto=where[1])
    else:
        i, j = where[1], where[2]
        last = req.messages[i]
        cut = MessageParam(role=last.role, content=_blocks(last)[: j + 1])
        messages = _messages(req, [*req.messages[:i], cut])
    if not messages:
        messages = [ChatMessage(role="user", content="")]
    return ChatCompletionRequest(messages=messages, tools=base.tools,
                                 tool_choice=choice if base.tools else None)


def to_chat(req: CountTokensRequest) -> Converted:
    """The chat request a Messages (or count_tokens) request renders like; 400s up front."""
    if not req.messages:
        raise InvalidRequestError("messages: at least one message is required", param="messages")
    history, prefill = req.messages, ""
    if req.messages[-1].role == "assistant" and len(req.messages) > 1:
        last = _blocks(req.messages[-1])
        if all(isinstance(b, TextBlock | ThinkingBlock) for b in last):
            history = req.messages[:-1]
            prefill = "\n".join(b.text for b in last if isinstance(b, TextBlock)).rstrip()
    tool_choice, parallel = _tool_choice(req)
    tools = _tools(req)
    warnings = dropped_tools(req)
    for warning in warnings:
        logger.warning("%s", warning)
    fields: dict[str, Any] = {
        "model": req.model, "messages": _messages(req, history), "tools": tools,
        "tool_choice": tool_choice, "parallel_tool_calls": parallel,
    }
    if req.output_config is not None and req.output_config.format is not None:
        fields["response_format"] = ResponseFormat.model_validate({
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": req.output_config.format.json_schema},
        })
    if tool_choice is not None and not tools:
        fields["tool_choice"] = None if tool_choice in ("none", "auto") else tool_choice
    if isinstance(req, MessagesRequest):
        fields["max_tokens"] = req.max_tokens
        fields["stop"] = req.stop_sequences or None
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(req, name)
            if value is not None:  # unset fields keep the model's catalog defaults
                fields[name] = value
        if req.metadata is not None and req.metadata.user_id:
            fields["user"] = req.metadata.user_id
        if req.keep_alive is not None:
            fields["keep_alive"] = req.keep_alive
        if req.cache_salt is not None:
            fields["cache_salt"] = req.cache_salt
        if req.thinking is not None and req.thinking.type != "adaptive":
            fields["thinking"] = req.thinking.type == "enabled"  # read by thinking templates
    try:
        chat = ChatCompletionRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequestError(f"{where}: {first.get('msg')}", param=where) from exc
    marks = _breakpoints(req)
    if not marks:
        return Converted(chat, prefill, None, 0.0, tuple(warnings))
    furthest = marks[-1][0]
    seconds = max(m.seconds for _, m in marks)
    return Converted(chat, prefill, _cut(req, furthest, chat), seconds, tuple(warnings))


def stop_reason(finished: Finished, max_tokens: int | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how a choice finished."""
    reason = finished.finish_reason
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        if max_tokens is not None and finished.completion_tokens < max_tokens:
            return "model_context_window_exceeded", None
        return "max_tokens", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None
