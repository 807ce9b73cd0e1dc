"""`llmserve models list|pull|verify|info|suggest|rm`: the catalog from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from llmserve.catalog import ollama
from llmserve.catalog.gguf_info import parameters_label
from llmserve.catalog.library import ModelLibrary
from llmserve.catalog.manifest import ManifestError, parse_ollama_ref
from llmserve.catalog.manifest_write import add_entry
from llmserve.catalog.ollama import default_filename
from llmserve.catalog.sources import (
    DEFAULT_TIMEOUT_S,
    FetchError,
    fetch,
    partial_path,
    sha256_file,
)
from llmserve.catalog.spec import (
    HuggingFaceSource,
    ModelSpec,
    OllamaSource,
    UrlSource,
    describe_source,
)
from llmserve.catalog.transfer import meta_path
from llmserve.errors import LlmserveError
from llmserve.units import format_size

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A one-line failure with the exit status it maps to."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def add_models_parser(sub: Any, flag: Any) -> None:
    """The `models` subcommands; flag(parser, name, **kw) adds --snake/--kebab spellings."""
    p = sub.add_parser("models", help="list, fetch, verify and inspect models")
    msub = p.add_subparsers(dest="models_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        flag(sp, "models_dir", type=Path, help="folder of GGUF files (default models)")
        flag(sp, "manifest", type=Path, help="models.yaml (default <models_dir>/models.yaml)")

    ls = msub.add_parser("list", help="catalog entries and the GGUF files present")
    common(ls)
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    pull = msub.add_parser("pull", help="download models into the models dir")
    pull.add_argument("names", nargs="+",
                      help="alias, file name, hf://owner/repo/file.gguf, "
                           "ollama://[namespace/]name[:tag] or URL")
    common(pull)
    pull.add_argument("--quiet", action="store_true", help="no progress bars")
    flag(pull, "timeout", type=float,
         help=f"network timeout per source in seconds (default {DEFAULT_TIMEOUT_S:g})")
    verify = msub.add_parser("verify", help="check the sha256 of present models")
    verify.add_argument("names", nargs="*", help="models to check (default: all present)")
    common(verify)
    info = msub.add_parser("info", help="GGUF metadata of a model")
    info.add_argument("name", help="alias or file name")
    common(info)
    info.add_argument("--json", action="store_true", help="JSON instead of text")
    suggest = msub.add_parser("suggest", help="models for a use case, best first")
    flag(suggest, "use_case", required=True, help="a use-case tag, e.g. chat, tools, tiny")
    common(suggest)
    rm = msub.add_parser("rm", help="delete downloaded model files (catalog entries stay)")
    rm.add_argument("names", nargs="+", help="alias or file name")
    common(rm)


def run_models(args: argparse.Namespace, models_dir: Path, templates_dir: Path) -> int:
    """Run a `models` subcommand; failures are one line on stderr and a non-zero status."""
    library = ModelLibrary(models_dir, args.manifest, templates_dir=templates_dir)
    commands = {
        "list": _list, "pull": _pull, "verify": _verify, "info": _info, "suggest": _suggest,
        "rm": _rm,
    }  # fmt: skip
    try:
        return commands[args.models_cmd](args, library)
    except ManifestError as exc:
        for line in exc.lines():
            sys.stderr.write(f"llmserve: {line}\n")
        return 2
    except CliError as exc:
        sys.stderr.write(f"llmserve: {exc}\n")
        return exc.code


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _size_text(d: dict[str, Any]) -> str:
    if d["size"] is not None:
        return format_size(d["size"])
    return f"~{d['size_label']}" if d.get("size_label") else "-"


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def _list(args: argparse.Namespace, library: ModelLibrary) -> int:
    described = [library.describe(e) for e in library.entries()]
    if args.json:
        _out(json.dumps(described, indent=2))
        return 0
    rows = [
        [
            d["alias"] or "-", d["file"], _size_text(d), d["arch"] or "-", d["quant"] or "-",
            str(d["context_length"] or "-"), _yes_no(d["has_template"]),
            "yes" if d["present"] else "no",
        ]
        for d in described
    ]  # fmt: skip
    header = ["ALIAS", "FILE", "SIZE", "ARCH", "QUANT", "CONTEXT", "TEMPLATE", "PRESENT"]
    _table(header, rows)
    return 0


def _adhoc_spec(name: str) -> ModelSpec | None:
    """A spec for `hf://owner/repo/file.gguf`, `ollama://[ns/]name[:tag]` or an http(s) URL
    ending in .gguf."""
    if name.startswith("ollama://"):
        try:
            ref = parse_ollama_ref(name)
        except ValueError as exc:
            raise CliError(str(exc), 2) from exc
        filename = default_filename(ref)
        source: HuggingFaceSource | UrlSource | OllamaSource = ref
    elif name.startswith("hf://"):
        owner, repo, path = [*name[len("hf://"):].split("/", 2), "", ""][:3]
        if not path.endswith(".gguf"):
            raise CliError(f"{name}: not hf://owner/repo/file.gguf", 2)
        filename = path.rsplit("/", 1)[-1]
        try:
            source = HuggingFaceSource(f"{owner}/{repo}", path)
        except ValueError as exc:  # `..` or empty segments: refused before any network
            raise CliError(f"{name}: {exc}", 2) from exc
    elif name.startswith(("http://", "https://")) and name.lower().endswith(".gguf"):
        filename = urllib.parse.unquote(urllib.parse.urlsplit(name).path.rsplit("/", 1)[-1])
        source = UrlSource(name)
    else:
        return None
    alias = re.sub(r"[^a-z0-9._+-]+", "-", filename[: -len(".gguf")].lower()).strip("-.")
    return ModelSpec(alias or "model", filename, None, None, f"pulled from {name}", (source,))


def _pull(args: argparse.Namespace, library: ModelLibrary) -> int:
    specs = []
    for name in args.names:
        spec = library.find_spec(name) or _adhoc_spec(name)
        if spec is None:
            known = ", ".join(library.catalog())
            raise CliError(
                f"unknown model {name!r}; known: {known} (or hf://owner/repo/file.gguf, "
                "ollama://name[:tag])", 2
            )
        specs.append(spec)
    timeout = args.timeout or DEFAULT_TIMEOUT_S
    for spec in specs:
        try:
            spec = _with_ollama_facts(spec, timeout)
            path = fetch(spec, library.models_dir, progress=not args.quiet, timeout=timeout)
        except FetchError as exc:
            raise CliError(str(exc)) from exc
        _out(f"{spec.alias}: {path}")
        if spec.origin == "builtin" and add_entry(library.manifest_path, spec):
            _out(f"{spec.alias}: added to {library.manifest_path}")
    return 0


def _with_ollama_facts(spec: ModelSpec, timeout: float) -> ModelSpec:
    """An ad-hoc `ollama://` spec with the registry's digest, size and parameter defaults,
    so the entry `pull` writes to models.yaml carries them."""
    source = spec.sources[0] if spec.sources else None
    if spec.origin != "builtin" or spec.sha256 or not isinstance(source, OllamaSource):
        return spec
    model = ollama.resolve(source, timeout)
    return dataclasses.replace(
        spec, sha256=model.sha256, size=model.size, load=model.load, sampling=model.sampling
    )


def _resolve(library: ModelLibrary, name: str) -> str:
    try:
        return library.resolve(name)
    except LlmserveError as exc:
        code = 1 if library.find_spec(name) else 2
        raise CliError(exc.message, code) from exc


def _verify(args: argparse.Namespace, library: ModelLibrary) -> int:
    if args.names:
        files = [_resolve(library, n) for n in args.names]
    else:
        files = [e.filename for e in library.entries() if e.present]
    if not files:
        _out(f"no models in {library.models_dir}")
        return 0
    bad = 0
    for filename in files:
        spec = library.spec_for_file(filename)
        path = library.models_dir / filename
        if spec is not None and spec.size is not None and path.stat().st_size != spec.size:
            bad += 1
            _out(f"MISMATCH  {filename}: {path.stat().st_size} bytes, expected {spec.size}")
        elif spec is None or not spec.sha256:
            _out(f"UNCHECKED {filename}: no sha256 in the catalog")
        elif (digest := sha256_file(path)) == spec.sha256:
            _out(f"OK        {filename}")
        else:
            bad += 1
            _out(f"MISMATCH  {filename}: sha256 {digest}, expected {spec.sha256}")
    if bad:
        sys.stderr.write(f"llmserve: {bad} model(s) failed verification\n")
        return 1
    return 0


def _info(args: argparse.Namespace, library: ModelLibrary) -> int:
    spec = library.find_spec(args.name)
    try:
        filename = library.resolve(args.name)
    except LlmserveError as exc:
        if spec is None:
            raise CliError(exc.message, 2) from exc
        filename = None
    spec = library.spec_for_file(filename) if filename else spec
    facts: dict[str, Any] = {"alias": spec.alias if spec else None}
    if spec is not None:
        facts |= {
            "description": spec.description,
            "use_cases": list(spec.use_cases),
            "sha256": spec.sha256,
            "sources": [describe_source(s) for s in spec.sources],
            "load_defaults": dict(spec.load),
            "sampling_defaults": dict(spec.sampling),
        }
    gguf = library.gguf(filename) if filename else None
    facts["file"] = str(library.models_dir / (filename or (spec.filename if spec else "")))
    facts["present"] = filename is not None
    if filename and gguf is None:
        raise CliError(f"{filename} is not a readable GGUF file")
    if gguf is not None and filename is not None:
        facts |= {
            "size": gguf.file_size,
            "architecture": gguf.architecture,
            "name": gguf.name,
            "parameters": gguf.parameters,
            "quantization": gguf.quantization,
            "context_length": gguf.context_length,
            "chat_template": library.has_template(filename, gguf),
            "gguf_chat_template": gguf.chat_template is not None,
            "special_tokens": {
                k: {"id": i, "text": t} for k, (i, t) in gguf.special_tokens.items()
            },
            "gguf_version": gguf.version,
            "tensors": gguf.tensor_count,
        }
    if args.json:
        _out(json.dumps(facts, indent=2))
        return 0
    _print_info(facts, spec)
    return 0


def _print_info(facts: dict[str, Any], spec: ModelSpec | None) -> None:
    def line(label: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            _out(f"{label + ':':<18}{value}")

    line("alias", facts.get("alias"))
    line("file", facts["file"])
    line("description", facts.get("description"))
    if not facts["present"]:
        size = spec.size if spec else None
        line("size", format_size(size) if size else (f"~{spec.size_label}" if spec else None))
        line("sources", "; ".join(facts.get("sources", [])))
        alias = spec.alias if spec else facts["file"]
        _out(f"not downloaded: run `llmserve models pull {alias}`")
        return
    line("size", f"{format_size(facts['size'])} ({facts['size']:,} bytes)")
    line("architecture", facts["architecture"])
    line("model name", facts["name"])
    params = facts["parameters"]
    line("parameters", f"{parameters_label(params)} ({params:,})" if params else None)
    line("quantization", facts["quantization"])
    line("context length", facts["context_length"])
    template = "yes" if facts["chat_template"] else "no"
    if facts["chat_template"] and not facts["gguf_chat_template"]:
        template += " (from the catalog or templates/, not the GGUF)"
    line("chat template", template)
    tokens = ", ".join(f"{k}={v['text']!r} ({v['id']})" for k, v in facts["special_tokens"].items())
    line("special tokens", tokens)
    line("gguf", f"version {facts['gguf_version']}, {facts['tensors']} tensors")
    line("use cases", ", ".join(facts.get("use_cases", [])))
    line("sha256", facts.get("sha256"))
    line("sources", "; ".join(facts.get("sources", [])))
    line("load defaults", facts.get("load_defaults"))
    line("sampling defaults", facts.get("sampling_defaults"))


def _suggest(args: argparse.Namespace, library: ModelLibrary) -> int:
    matches = library.suggest(args.use_case)
    if not matches:
        tags = ", ".join(library.use_cases())
        raise CliError(f"no catalog model is tagged {args.use_case!r}; use cases: {tags}")
    rows = []
    for e in matches:
        d = library.describe(e)
        rows.append([d["alias"] or "-", d["file"], _size_text(d),
                     "yes" if e.present else "no", d["description"]])  # fmt: skip
    _table(["ALIAS", "FILE", "SIZE", "PRESENT", "DESCRIPTION"], rows)
    best = matches[0]
    hint = "" if best.present else f" (run `llmserve models pull {best.alias}`)"
    _out(f"suggested: {best.alias or best.filename}{hint}")
    return 0


def _rm(args: argparse.Namespace, library: ModelLibrary) -> int:
    files = [_resolve(library, n) for n in args.names]
    for filename in files:
        path = library.models_dir / filename
        size = path.stat().st_size
        path.unlink()
        partial = partial_path(library.models_dir, filename)
        partial.unlink(missing_ok=True)
        meta_path(partial).unlink(missing_ok=True)
        _out(f"removed {path} ({format_size(size)})")
    return 0
