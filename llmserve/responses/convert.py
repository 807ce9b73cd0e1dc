"""Responses input -> a chat completion request: items, instructions, tools, tool_choice,
text.format. Every 400 a Responses request can earn here names its Responses parameter."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmserve.errors import InvalidRequestError
from llmserve.responses.schemas import ResponsesRequest, TextConfig
from llmserve.responses.tools import ToolSet, tool_set
from llmserve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionName,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    ToolCall,
    ToolCallFunction,
    freeform_arguments,
)

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # chat's reasoning_effort
ITEM_TYPES = ("message", "function_call", "function_call_output", "custom_tool_call",
              "custom_tool_call_output", "reasoning")
TEXT_PARTS = ("input_text", "output_text", "text")
ROLES = ("user", "system", "developer", "assistant")


def new_id(prefix: str) -> str:
    """`<prefix>_` and 32 hex digits, like OpenAI's resp_/msg_/fc_ ids."""
    return f"{prefix}_{uuid.uuid4().hex}"


def check_unsupported(req: ResponsesRequest) -> None:
    """400 for request fields llmserve cannot honour (rather than silently ignoring them)."""
    if req.background:
        raise InvalidRequestError("background responses are not supported", param="background")
    if req.conversation is not None:
        raise InvalidRequestError(
            "conversations are not supported: use previous_response_id", param="conversation"
        )
    if req.prompt is not None:
        raise InvalidRequestError("prompt templates are not supported", param="prompt")
    if req.n != 1:
        raise InvalidRequestError("n is not supported by the Responses API", param="n")
    if req.input is None:
        raise InvalidRequestError("missing required parameter: 'input'", param="input")


# -- input items -------------------------------------------------------------------------------


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as canonical items with ids (what input_items lists back)."""
    if isinstance(value, str):
        return [_message_item(new_id("msg"), "user", [value])]
    return [_item(i, raw) for i, raw in enumerate(value)]


def _message_item(item_id: str, role: str, texts: list[str]) -> dict[str, Any]:
    if role == "assistant":
        content = [{"type": "output_text", "text": t, "annotations": []} for t in texts]
    else:
        content = [{"type": "input_text", "text": t} for t in texts]
    return {"id": item_id, "type": "message", "role": role, "content": content,
            "status": "completed"}


def _str_field(i: int, raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"input[{i}].{name} must be a string", param=f"input.{i}.{name}"
        )
    return value


def _item(i: int, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"input[{i}] must be an object", param=f"input.{i}")
    kind = raw.get("type") or ("message" if "role" in raw else None)
    item_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else None
    if kind == "message":
        role = raw.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"input[{i}].role must be one of {', '.join(ROLES)} (got {role!r})",
                param=f"input.{i}.role",
            )
        return _message_item(item_id or new_id("msg"), role, _texts(i, raw.get("content")))
    if kind in ("function_call", "custom_tool_call"):
        return _call_item(i, raw, kind, item_id)
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = raw.get("output")
        text = output if isinstance(output, str) else "".join(
            _texts(i, output, where=f"input[{i}].output")
        )
        prefix = "fco" if kind == "function_call_output" else "ctco"
        return {"id": item_id or new_id(prefix), "type": kind,
                "call_id": _str_field(i, raw, "call_id"), "output": text,
                "status": "completed"}
    if kind == "reasoning":
        # NOTE: kept (and listed back) but not rendered into the prompt; see events.py.
        return {**raw, "id": item_id or new_id("rs")}
    raise InvalidRequestError(
        f"input[{i}] has type {kind!r}, which llmserve does not support (supported: "
        f"{', '.join(ITEM_TYPES)})", param=f"input.{i}.type",
    )


def _call_item(i: int, raw: dict[str, Any], kind: str, item_id: str | None) -> dict[str, Any]:
    """A function_call (JSON arguments) or custom_tool_call (freeform input) item."""
    item = {"id": item_id, "type": kind, "call_id": _str_field(i, raw, "call_id"),
            "name": _str_field(i, raw, "name")}
    if kind == "function_call":
        arguments = _str_field(i, raw, "arguments")
        try:
            json.loads(arguments or "{}")
        except ValueError:
            raise InvalidRequestError(
                f"input[{i}].arguments is not valid JSON", param=f"input.{i}.arguments"
            ) from None
        item.update(id=item_id or new_id("fc"), arguments=arguments)
    else:
        item.update(id=item_id or new_id("ctc"), input=_str_field(i, raw, "input"))
    if isinstance(raw.get("namespace"), str) and raw["namespace"]:
        item["namespace"] = raw["namespace"]  # a namespace tool's call (see tools.py)
    item["status"] = "completed"
    return item


def _texts(i: int, content: Any, where: str | None = None) -> list[str]:
    where = where or f"input[{i}].content"
    param = re.sub(r"\[(\d+)\]", r".\1", where)
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"{where}[{j}] has type {kind!r}; only text parts (input_text, output_text) "
                "are supported", param=f"{param}.{j}.type",
            )
        texts.append(part["text"])
    return texts


def chat_messages(
    instructions: str | None, items: list[dict[str, Any]], first_input: int = 0,
    tools: ToolSet | None = None,
) -> list[ChatMessage]:
    """Canonical items as chat messages: consecutive function calls join the assistant turn
    before them, as our own output rendered them (so the prompt cache sees one prefix).
    Custom tool calls render as the function calls the model made for them, under the
    names the model knows (tools.flat_name).

    first_input: index of the request's first input item (earlier ones are history)."""
    tools = tools or ToolSet()
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    calls: set[str] = set()
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            text = "".join(part["text"] for part in item["content"])
            messages.append(ChatMessage(role=item["role"], content=text))
        elif kind in ("function_call", "custom_tool_call"):
            arguments = (item["arguments"] if kind == "function_call"
                         else freeform_arguments(item["input"]))
            call = ToolCall(id=item["call_id"], function=ToolCallFunction(
                name=tools.flat_name(item.get("namespace"), item["name"]),
                arguments=arguments))
            calls.add(item["call_id"])
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if item["call_id"] not in calls:
                n = i - first_input
                raise InvalidRequestError(
                    f"input[{n}] is a {kind} for call_id {item['call_id']!r}, "
                    "but no earlier tool call has that call_id",
                    param=f"input.{n}.call_id" if n >= 0 else "previous_response_id",
                )
            messages.append(
                ChatMessage(role="tool", content=item["output"], tool_call_id=item["call_id"])
            )
    if not messages:
        raise InvalidRequestError("input has no messages", param="input")
    return messages


# -- tools, tool_choice, text.format ------------------------------------------------------------


def chat_tool_choice(choice: str | dict[str, Any] | None, tools: ToolSet | None = None) -> Any:
    """Responses tool_choice as chat's: the three strings, or {"type": "function" | "custom",
    "name"} (a namespace tool's with its "namespace")."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and isinstance(choice.get("name"), str):
            namespace = choice.get("namespace")
            name = (tools or ToolSet()).flat_name(
                namespace if isinstance(namespace, str) else None, choice["name"])
            return NamedToolChoice(function=FunctionName(name=name))
        raise InvalidRequestError(
            f"tool_choice of type {kind!r} is not supported (use none, auto, required, "
            '{"type": "function", "name": ...} or {"type": "custom", "name": ...})',
            param="tool_choice",
        )
    raise InvalidRequestError(
        f"tool_choice must be none, auto, required or a function (got {choice!r})",
        param="tool_choice",
    )


def response_format(text: TextConfig | None) -> ResponseFormat | None:
    """text.format (text, json_object, json_schema) as chat's response_format."""
    fmt = text.format if text is not None else None
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return ResponseFormat(type=kind)
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(
                "text.format json_schema needs a schema", param="text.format.schema"
            )
        spec = JsonSchemaFormat.model_validate({
            "name": fmt.get("name") or "response", "description": fmt.get("description"),
            "schema": schema, "strict": fmt.get("strict"),
        })
        return ResponseFormat(type="json_schema", json_schema=spec)
    raise InvalidRequestError(
        f"text.format has type {kind!r}; supported: text, json_object, json_schema",
        param="text.format.type",
    )


def text_echo(text: TextConfig | None) -> dict[str, Any]:
    """The response's `text` field: the format asked for (text by default)."""
    fmt = dict(text.format) if text is not None and text.format else {"type": "text"}
    if fmt.get("type") == "json_schema":
        fmt.setdefault("name", "response")  # NOTE: the SDK's type requires a name
    out: dict[str, Any] = {"format": fmt}
    if text is not None and text.verbosity is not None:
        out["verbosity"] = text.verbosity
    return out


# -- the chat request ---------------------------------------------------------------------------


def chat_request(
    req: ResponsesRequest, history: list[dict[str, Any]], items: list[dict[str, Any]],
    tools: ToolSet | None = None,
) -> ChatCompletionRequest:
    """The chat completion that generates this response (history: earlier turns' items;
    tools: tool_set(req.tools), when the caller has it already)."""
    tools = tools if tools is not None else tool_set(req.tools)
    shared = set(SamplingFields.model_fields) - {"stream", "stream_options", "n", "max_tokens"}
    fields = req.model_dump(include=shared, exclude_unset=True)
    return ChatCompletionRequest(
        **fields,
        messages=chat_messages(req.instructions, [*history, *items], len(history), tools),
        max_completion_tokens=req.max_output_tokens or req.max_tokens,
        tools=tools.chat or None,
        tool_choice=chat_tool_choice(req.tool_choice, tools),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format(req.text),
        reasoning_effort=reasoning_effort(req.reasoning),
    )


def reasoning_effort(reasoning: dict[str, Any] | None) -> Any:
    """`reasoning.effort` for templates that read it (chat's reasoning_effort); 400 if unknown."""
    effort = (reasoning or {}).get("effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequestError(f"reasoning.effort must be one of {', '.join(EFFORTS)}",
                                  param="reasoning.effort")
    return effort


_PARAMS = [
    (re.compile(r"^response_format\.json_schema"), "text.format.schema"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^tools\.(\d+)\.function\."), r"tools.\1."),
    (re.compile(r"^messages(\..*)?$"), "input"),
    (re.compile(r"^max_completion_tokens$"), "max_output_tokens"),
]


def responses_param(param: str | None) -> str | None:
    """A chat request's error param, named as the Responses request spells it."""
    if param is None:
        return None
    for pattern, repl in _PARAMS:
        if pattern.search(param):
            return pattern.sub(repl, param)
    return param
