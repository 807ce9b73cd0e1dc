"""Command line: `llmserve serve`, `llmserve models list|pull` (also `python -m llmserve`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from llmserve import __version__
from llmserve.config import Settings

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _flag(parser: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """Add --snake_name with its --kebab-name spelling; default None so env vars apply."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, default=None, **kw)


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (default command)")
    _flag(p, "host", help="address to bind (default 127.0.0.1)")
    _flag(p, "port", type=int, help="port (default 8000)")
    _flag(p, "model_name", help="GGUF file in the models dir to load at start")
    _flag(p, "models_dir", type=Path, help="folder of GGUF files (default models)")
    _flag(p, "cache_dir", type=Path, help="prompt cache folder (default cache)")
    _flag(p, "templates_dir", type=Path, help="chat template overrides (default templates)")
    _flag(p, "chat_template",
          help="chat template for every model: a name in the templates dir (chatml, gemma, "
               "llama3, mistral), a .jinja file, or inline Jinja (default: per model)")
    _flag(p, "n_ctx", type=int, help="context length in tokens, 0 = the model's (default 4096)")
    _flag(p, "n_gpu_layers", type=int, help="layers to offload to the GPU, -1 = all (default 0)")
    _flag(p, "n_threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    _flag(p, "n_batch", type=int, help="prompt batch size (default 512)")
    _flag(p, "stream_interval_ms", type=float,
          help="join tokens produced within this many ms into one SSE chunk (default 20)")
    _flag(p, "log_level", choices=["critical", "error", "warning", "info", "debug"],
          help="log level (default info)")


def _models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list or fetch models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    ls = msub.add_parser("list", help="built-in catalog and the GGUF files present")
    _flag(ls, "models_dir", type=Path, help="folder of GGUF files (default models)")
    pull = msub.add_parser("pull", help="download catalog models into the models dir")
    pull.add_argument("names", nargs="+", help="catalog alias or file name")
    _flag(pull, "models_dir", type=Path, help="folder of GGUF files (default models)")
    pull.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI."""
    parser = argparse.ArgumentParser(prog="llmserve", description="local OpenAI-compatible server")
    parser.add_argument("--version", action="version", version=f"llmserve {__version__}")
    sub = parser.add_subparsers(dest="command")
    _serve_parser(sub)
    _models_parser(sub)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings(**given)


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"llmserve: {message}\n")
    return code


def serve(settings: Settings) -> int:
    """Check the model exists, then serve until interrupted."""
    import uvicorn

    from llmserve.catalog.registry import resolve_model_name
    from llmserve.chat.templates import load_override
    from llmserve.errors import LlmserveError
    from llmserve.http.app import create_app

    try:
        resolve_model_name(settings.models_dir, settings.model_name)
    except LlmserveError as exc:
        return _fail(f"{exc.message} (models dir: {settings.models_dir})")
    if settings.chat_template:
        try:
            load_override(settings.chat_template, settings.templates_dir)
        except LlmserveError as exc:
            return _fail(exc.message)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def models(args: argparse.Namespace) -> int:
    """`models list` and `models pull`."""
    from llmserve.catalog.builtin import BUILTIN, find_spec
    from llmserve.catalog.registry import list_model_files
    from llmserve.catalog.sources import FetchError, fetch

    models_dir = args.models_dir or Settings().models_dir
    if args.models_cmd == "list":
        present = {m.name: m.size for m in list_model_files(models_dir)}
        rows = [(s.alias, s.filename, "yes" if s.filename in present else "no")
                for s in BUILTIN.values()]
        rows += [("-", name, "yes") for name in present if name not in
                 {s.filename for s in BUILTIN.values()}]
        width = max(len(r[1]) for r in rows) if rows else 10
        sys.stdout.write(f"{'ALIAS':<16} {'FILE':<{width}} PRESENT\n")
        for alias, filename, here in rows:
            sys.stdout.write(f"{alias:<16} {filename:<{width}} {here}\n")
        return 0
    specs = []
    for name in args.names:
        spec = find_spec(name)
        if spec is None:
            known = ", ".join(BUILTIN)
            return _fail(f"unknown model {name!r}; known: {known}")
        specs.append(spec)
    models_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        try:
            path = fetch(spec, models_dir, progress=not args.quiet)
        except FetchError as exc:
            return _fail(str(exc), 1)
        sys.stdout.write(f"{spec.alias}: {path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llmserve` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # NOTE: `llmserve --port 9000` means `llmserve serve --port 9000` (server.py's usage).
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = _settings(args)
        except ValueError as exc:
            return _fail(f"invalid setting: {exc}")
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
        return serve(settings)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    return models(args)
