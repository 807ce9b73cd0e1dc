"""Appending entries to models.yaml (what `pull` does), keeping the user's comments."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from llmserve.catalog.manifest import compose_yaml, parse_manifest
from llmserve.catalog.spec import ModelSpec, spec_to_dict

_HEADER = (
    "# llmserve model manifest: alias -> file, defaults and download sources (see README).\n"
    "version: 1\nmodels:\n"
)


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key (PyYAML's default puts `-` at the key's column)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    """Short lists of scalars on one line (`use_cases: [chat, tools]`)."""
    flow = all(isinstance(x, str | int | float) for x in data) and len(str(data)) <= 60
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def add_entry(path: Path, spec: ModelSpec) -> bool:
    """Append spec to models.yaml (created if missing); False when its alias is already there.

    Appending keeps the user's comments and layout; a manifest whose `models` mapping is not
    the last block of the file is rewritten instead (comments lost).
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    existing = parse_manifest(text, path)
    if spec.alias in existing:
        return False
    entry = yaml.dump(
        {spec.alias: spec_to_dict(spec)}, Dumper=_Dumper, sort_keys=False,
        default_flow_style=False, allow_unicode=True, width=100,
    )  # fmt: skip
    node, data = compose_yaml(text, path)
    indent = _append_indent(node)
    if not text.strip():
        new = _HEADER + _indent(entry, 2)
    elif indent is not None:
        new = text + ("" if text.endswith("\n") else "\n") + _indent(entry, indent)
    else:
        data = dict(data or {})
        data.setdefault("version", 1)
        data["models"] = {**(data.get("models") or {}), spec.alias: spec_to_dict(spec)}
        new = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    parse_manifest(new, path)  # never write a manifest we could not read back
    _write_atomic(path, new)
    return True


def _append_indent(root: yaml.Node | None) -> int | None:
    """The column new aliases go at when appending works (`models` is the last block)."""
    if not isinstance(root, yaml.MappingNode) or not root.value or root.flow_style:
        return None
    key, value = root.value[-1]
    if key.value != "models":
        return None
    if isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null":
        return 2
    if isinstance(value, yaml.MappingNode) and not value.flow_style and value.value:
        return int(value.value[0][0].start_mark.column)
    return None


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: mkstemp makes the file 0600; keep the old file's mode (or the usual 0644).
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
