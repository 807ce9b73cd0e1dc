"""A Responses request's tools: what the model is offered, and how its calls go back.

- `function`: offered as is.
- `custom` (freeform text input): offered as a function with one string argument
  (chat/custom_tools.py); its calls come back as `custom_tool_call` items.
- `namespace` (Codex CLI's `{"type": "namespace", "name", "tools": [...]}`): each inner tool is
  offered under the flat name `<namespace>__<name>` (Codex's own flattening,
  codex-rs/protocol/src/tool_name.rs); its calls come back with `name` the inner name and
  `namespace` set, which is what Codex dispatches on (codex-rs/core/src/tools/router.rs,
  build_tool_call: `ToolName::new(namespace, name)`).
- hosted tools (web_search, file_search, ..., Codex's tool_search): accepted, not offered.
- anything else: a 400 naming the type.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmserve.errors import InvalidRequestError
from llmserve.responses.schemas import FunctionTool
from llmserve.schemas import (
    CustomToolDefinition,
    CustomToolSpec,
    FunctionDefinition,
    ToolDefinition,
)

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# Tools OpenAI runs on its side (or, tool_search, Codex's client-side discovery, which needs
# its own output item): nothing here can run them, so the model is not told about them.
HOSTED = frozenset({
    "web_search", "web_search_preview", "file_search", "code_interpreter",
    "image_generation", "local_shell", "computer_use_preview", "computer_use", "mcp",
    "tool_search",
})
_HOSTED_DATED = ("web_search_preview_", "web_search_")  # web_search_2025_08_26, ...
SEPARATOR = "__"  # codex-rs/protocol/src/tool_name.rs: NAMESPACED_TOOL_NAME_DELIMITER
MAX_NAME = 64


@dataclass(frozen=True)
class Target:
    """What a flat tool name the model calls means to the client."""

    name: str
    namespace: str | None = None
    custom: bool = False


@dataclass
class ToolSet:
    """The request's tools as chat tools, and the way back from the names the model sees."""

    chat: list[ToolDefinition | CustomToolDefinition] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)  # flat name -> client's name
    flat: dict[tuple[str | None, str], str] = field(default_factory=dict)
    hosted: list[str] = field(default_factory=list)

    def target(self, flat_name: str) -> Target:
        """The client's tool behind a name the model called (itself when unknown)."""
        return self.targets.get(flat_name) or Target(flat_name)

    def flat_name(self, namespace: str | None, name: str) -> str:
        """The name the model knows a client's (namespace, name) tool by."""
        return self.flat.get((namespace or None, name)) or (
            joined(namespace, name) if namespace else name)

    def _add(self, i: str, raw: Any, namespace: str | None) -> None:
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "function":
            fn = _validated(FunctionTool, raw, i)
            flat = self._claim(namespace, fn.name, custom=False)
            self.chat.append(ToolDefinition(type="function", function=FunctionDefinition(
                name=flat, description=fn.description, parameters=fn.parameters,
                strict=fn.strict)))
        elif kind == "custom":
            spec = _validated(CustomToolSpec, raw, i)
            flat = self._claim(namespace, spec.name, custom=True)
            self.chat.append(CustomToolDefinition(
                type="custom", custom=spec.model_copy(update={"name": flat})))
        elif kind == "namespace" and namespace is None:
            name, inner = raw.get("name"), raw.get("tools")
            if not isinstance(name, str) or not name or not isinstance(inner, list):
                raise InvalidRequestError(
                    f"tools[{i}] (namespace) needs a name and a list of tools",
                    param=f"tools.{i}")
            for j, tool in enumerate(inner):
                self._add(f"{i}].tools[{j}", tool, name)
        elif isinstance(kind, str) and _is_hosted(kind) and namespace is None:
            self.hosted.append(kind)
        else:
            allowed = "function and custom tools" if namespace else (
                "function, custom and namespace tools, and accepts hosted tools ("
                f"{', '.join(sorted(HOSTED))}) without offering them to the model")
            raise InvalidRequestError(
                f"tools[{i}] has type {kind!r}; llmserve supports {allowed}",
                param=f"{_param(i)}.type",
            )

    def _claim(self, namespace: str | None, name: str, *, custom: bool) -> str:
        flat = joined(namespace, name) if namespace else name
        if flat in self.targets or len(flat) > MAX_NAME:
            # NOTE: a clash (two namespaces flattening alike, a plain tool of that name) or
            # a name past 64 characters: a short hash keeps each tool callable.
            digest = hashlib.sha1(f"{namespace}\0{name}".encode()).hexdigest()[:8]
            flat = f"{flat[: MAX_NAME - 9]}_{digest}"
        if (namespace, name) in self.flat:
            where = f"namespace {namespace!r}" if namespace else "tools"
            raise InvalidRequestError(f"duplicate tool name {name!r} in {where}",
                                      param="tools")
        self.targets[flat] = Target(name, namespace, custom)
        self.flat[(namespace, name)] = flat
        return flat


def joined(namespace: str | None, name: str) -> str:
    """Codex's canonical flat name: `<namespace>__<name>`, stray underscores trimmed."""
    if not namespace:
        return name
    return f"{namespace.rstrip('_')}{SEPARATOR}{name.lstrip('_')}"


def tool_set(tools: list[Any] | None) -> ToolSet:
    """The request's tools checked (400s name `tools.<i>...`) and flattened."""
    out = ToolSet()
    for i, raw in enumerate(tools or []):
        out._add(str(i), raw, None)
    if out.hosted:
        logger.info("hosted tools accepted but not offered to the model: %s",
                    ", ".join(out.hosted))
    return out


def _is_hosted(kind: str) -> bool:
    return kind in HOSTED or kind.startswith(_HOSTED_DATED)


def _param(i: str) -> str:
    return "tools." + i.replace("].tools[", ".tools.")


def _validated(model: type[M], raw: dict[str, Any], i: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        param = f"{_param(i)}.{loc}"
        raise InvalidRequestError(
            f"invalid parameter '{param}': {first.get('msg', 'invalid value')}", param=param,
        ) from None
