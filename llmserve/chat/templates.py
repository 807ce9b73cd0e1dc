"""Chat template resolution and sandboxed Jinja rendering.

A GGUF's chat template is untrusted input (CVE-2024-34359 ran code through exactly this), so
templates render in jinja2's ImmutableSandboxedEnvironment with only the helpers HF templates
expect: bos_token, eos_token, add_generation_prompt, tools, raise_exception, strftime_now, tojson.

Resolution, per model: --chat_template (a name in templates/, a file, or inline Jinja) ->
templates/<model file stem>.jinja -> templates/<family>.jinja for architectures whose GGUFs
carry no template (Gemma) -> the GGUF's tokenizer.chat_template -> a 400 naming the file to add.
When a request uses tools and that template ignores them (SmolLM2's does), the tool-capable
template of the same family is used instead (templates/chatml.jinja for ChatML, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmserve.chat.tools import detect_family
from llmserve.engine.base import ModelInfo
from llmserve.errors import InvalidRequestError, LlmserveError

logger = logging.getLogger(__name__)

# Architecture -> template file in templates/ for models whose GGUF carries no template.
FAMILY_TEMPLATES = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}
# Markup in a template -> its tool-capable template in templates/.
TOOL_TEMPLATES = (
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3"),
    ("[INST]", "mistral"),
)
# NOTE: the templates shipped with llmserve, found even when the server runs elsewhere.
SHIPPED_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


class TemplateRenderError(LlmserveError):
    """The chat template failed or tried something the sandbox forbids."""

    status = 500
    type = "server_error"
    code = "template_error"


class NoTemplateError(InvalidRequestError):
    code = "no_chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    """A template's source, where it came from, and its tool-call family."""

    source: str
    origin: str
    family: str


def _find(templates_dir: Path, name: str) -> Path | None:
    for folder in (templates_dir, SHIPPED_TEMPLATES):
        path = folder / name
        if path.is_file():
            return path
    return None


def load_override(value: str, templates_dir: Path) -> ChatTemplate:
    """--chat_template: a template name in templates/, a file path, or inline Jinja."""
    if "{{" in value or "{%" in value:
        return ChatTemplate(value, "--chat_template", detect_family(value))
    stem = value[: -len(".jinja")] if value.endswith(".jinja") else value
    path = _find(templates_dir, f"{stem}.jinja") if "/" not in value else None
    if path is None and Path(value).is_file():
        path = Path(value)
    if path is None:
        raise NoTemplateError(
            f"--chat_template {value!r} is neither a template in {templates_dir} nor a file"
        )
    source = path.read_text(encoding="utf-8")
    return ChatTemplate(source, str(path), detect_family(source))


def resolve_template(
    info: ModelInfo, templates_dir: Path, override: str | None = None, *, tools: bool = False
) -> ChatTemplate:
    """The template for a model; with tools=True, one that renders tools and tool calls."""
    if override:
        found = load_override(override, templates_dir)
    else:
        found = _model_template(info, templates_dir)
    if tools and not uses_tools(found.source):
        for marker, name in TOOL_TEMPLATES:
            path = _find(templates_dir, f"{name}.jinja") if marker in found.source else None
            if path is not None:
                logger.debug("%s ignores tools; using %s", found.origin, path)
                source = path.read_text(encoding="utf-8")
                return ChatTemplate(source, str(path), detect_family(source))
    return found


def _model_template(info: ModelInfo, templates_dir: Path) -> ChatTemplate:
    """models.yaml chat_template, templates/<model>.jinja, family file, then the GGUF's."""
    if info.template_override:
        source = info.template_override
        return ChatTemplate(source, "models.yaml", detect_family(source))
    stem = Path(info.name).stem
    candidates = [f"{stem}.jinja"]
    family = FAMILY_TEMPLATES.get(info.architecture)
    if family:
        candidates.append(f"{family}.jinja")
    for name in candidates:
        path = _find(templates_dir, name)
        if path is not None:
            source = path.read_text(encoding="utf-8")
            return ChatTemplate(source, str(path), detect_family(source))
    if info.chat_template:
        return ChatTemplate(info.chat_template, "gguf", detect_family(info.chat_template))
    raise NoTemplateError(
        f"model {info.name!r} has no chat template in its GGUF metadata; "
        f"add one as {templates_dir / (stem + '.jinja')} or start with --chat_template"
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False,
    **_: Any,
) -> str:
    # NOTE: HF templates expect transformers' tojson (no HTML escaping, unicode kept).
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def make_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox, configured like transformers' apply_chat_template."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    return make_environment().from_string(source)


@lru_cache(maxsize=16)
def uses_tools(source: str) -> bool:
    """Whether a template reads the `tools` variable at all."""
    try:
        return "tools" in meta.find_undeclared_variables(make_environment().parse(source))
    except TemplateError:
        return False


def render(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render messages through a chat template in the sandbox (variables: extra ones the
    request sets, e.g. enable_thinking, reasoning_effort)."""
    try:
        template = _compile(source)
        return str(
            template.render(
                **(variables or {}),
                messages=messages,
                bos_token=bos_token,
                eos_token=eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
            )
        )
    except SecurityError as exc:
        logger.warning("chat template blocked by the sandbox: %s", exc)
        raise TemplateRenderError("chat template tried an unsafe operation") from exc
    except TemplateError as exc:
        raise InvalidRequestError(f"chat template error: {exc}", param="messages") from exc
    except Exception as exc:  # a broken template must fail the request, not the server
        raise TemplateRenderError(f"chat template failed: {exc}") from exc
