"""Chat template resolution and sandboxed Jinja rendering.

A GGUF's chat template is untrusted input (CVE-2024-34359 ran code through exactly this), so
templates render in jinja2's ImmutableSandboxedEnvironment.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmserve.engine.base import ModelInfo
from llmserve.errors import InvalidRequestError, LlmserveError

logger = logging.getLogger(__name__)

# Architecture -> template file in templates/ for models whose GGUF carries no template.
FAMILY_TEMPLATES = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}


class TemplateRenderError(LlmserveError):
    """The chat template failed or tried something the sandbox forbids."""

    status = 500
    type = "server_error"
    code = "template_error"


class NoTemplateError(InvalidRequestError):
    code = "no_chat_template"


def resolve_template(info: ModelInfo, templates_dir: Path) -> tuple[str, str]:
    """(source, origin): catalog override, templates/<model>.jinja, family file, GGUF."""
    if info.template_override:
        return info.template_override, "catalog"
    stem = Path(info.name).stem
    candidates = [templates_dir / f"{stem}.jinja"]
    family = FAMILY_TEMPLATES.get(info.architecture)
    if family:
        candidates.append(templates_dir / f"{family}.jinja")
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
    if info.chat_template:
        return info.chat_template, "gguf"
    raise NoTemplateError(
        f"model {info.name!r} has no chat template in its GGUF metadata; "
        f"add one as {templates_dir / (stem + '.jinja')}"
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # NOTE: HF templates expect transformers' tojson (no HTML escaping, unicode kept).
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render messages through a chat template in the sandbox."""
    try:
        template = _compile(source)
        return str(
            template.render(
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
