"""Command line: `llmserve serve`, `models`, `cache`, `discover`, `install`, `llama` (also
`python -m llmserve`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from llmserve.catalog.cli_models import add_models_parser, run_models
from llmserve.config import CACHE_TYPES, FLASH_ATTN, Settings
from llmserve.units import parse_size
from llmserve.version import __version__

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _flag(parser: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """Add --snake_name with its --kebab-name spelling; default None so env vars apply."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, default=None, **kw)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)") from None


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API (default command)")
    _flag(p, "host", help="address to bind (default 127.0.0.1)")
    _flag(p, "port", type=int, help="port (default 8000)")
    _flag(p, "model_name", help="alias or GGUF file in the models dir to load at start")
    _flag(p, "models_dir", type=Path, help="folder of GGUF files (default models)")
    _flag(p, "cache_dir", type=Path, help="prompt cache folder (default cache)")
    _flag(p, "templates_dir", type=Path, help="chat template overrides (default templates)")
    _flag(p, "chat_template",
          help="chat template for every model: a name in the templates dir (chatml, gemma, "
               "llama3, mistral), a .jinja file, or inline Jinja (default: per model)")
    _flag(p, "n_ctx", type=int,
          help="context length in tokens, shared by the --parallel sequences; 0 = the "
               "model's trained context (default: the trained context, lowered if its KV "
               "cache would take over half the memory available after the weights)")
    _flag(p, "n_gpu_layers", type=int, help="layers to offload to the GPU, -1 = all (default 0)")
    _flag(p, "n_threads", type=int, help="CPU threads for decoding (default: physical cores)")
    _flag(p, "n_threads_batch", type=int,
          help="CPU threads for prompt processing (default: --n_threads)")
    _flag(p, "n_batch", type=int, help="tokens per decode step, all sequences (default 512)")
    for kv in ("k", "v"):
        _flag(p, f"cache_type_{kv}", type=str.lower, choices=CACHE_TYPES, metavar="TYPE",
              help=f"KV cache type for {kv.upper()}: {', '.join(CACHE_TYPES)} (llama-server's "
                   f"-ct{kv}; q8_0 holds about twice the tokens of f16; default f16)")
    _flag(p, "flash_attn", type=str.lower, choices=FLASH_ATTN,
          help="flash attention: auto (where the device supports it), on, off; a quantized "
               "V cache needs it (llama-server's -fa; default auto)")
    _flag(p, "draft", choices=["none", "ngram"],
          help="speculative decoding draft source: ngram = prompt lookup (continuations of "
               "the sequence's last tokens found in its prompt and output); none (default)")
    _flag(p, "draft_model", metavar="FILE|ALIAS",
          help="a smaller GGUF with the same vocabulary that drafts tokens for every sequence "
               "(llama-server's -md); wins over --draft ngram")
    _flag(p, "draft_max", type=int, help="most tokens drafted per step (default 16)")
    _flag(p, "draft_min", type=int,
          help="a draft shorter than this is not verified, and this much of a longer one "
               "always is (default 0: drafts are sized by their acceptance so far and the "
               "measured cost of a step)")
    _flag(p, "parallel", type=int,
          help="sequences decoded together in one context; they share --n_ctx (default 4)")
    _flag(p, "max_queue", type=int,
          help="requests waiting for a free sequence before a 503 (default 256)")
    _flag(p, "prompt_cache", choices=["tiered", "ram", "llama_disk", "off"],
          help="prompt cache: RAM + disk tiers, RAM only, llama-cpp-python's LlamaDiskCache, "
               "or none (default tiered)")
    _flag(p, "cache_ram_bytes", type=_size, help="RAM tier capacity, e.g. 2G (default 2G)")
    _flag(p, "cache_disk_bytes", type=_size, help="disk tier capacity, e.g. 10G (default 10G)")
    _flag(p, "cache_block_tokens", type=int, help="tokens per cache block (default 64)")
    _flag(p, "stream_interval_ms", type=float,
          help="join tokens produced within this many ms into one SSE chunk (default 20)")
    _flag(p, "responses_max", type=int,
          help="stored Responses API responses kept (oldest dropped first; 0 = none; "
               "default 1000)")
    _flag(p, "reasoning_format", choices=["auto", "deepseek", "none"],
          help="thinking (<think>, gpt-oss channels) as reasoning_content: auto/deepseek "
               "when the markup appears, none = left in the content (default auto)")
    _flag(p, "max_body_bytes", type=_size,
          help="largest request body, e.g. 32M; bigger ones get a 413 (default 32M)")
    _flag(p, "max_header_bytes", type=_size,
          help="largest request line + headers; bigger ones get a 431 (default 64K)")
    _flag(p, "max_messages", type=int, help="most messages in one chat request (default 2048)")
    _flag(p, "max_tokens", type=int,
          help="output limit of requests that set none (llama-server's -n; default: until "
               "the context ends)")
    _flag(p, "timeout_keep_alive", type=float,
          help="close an idle keep-alive connection after this many seconds (default 5)")
    _flag(p, "timeout_headers", type=float,
          help="close a connection whose request headers take longer (seconds, default 10)")
    _flag(p, "timeout_body", type=float,
          help="408 when a request body takes longer to arrive (seconds, default 60)")
    _flag(p, "timeout_graceful_shutdown", type=float,
          help="on SIGTERM, wait this long for open requests before closing (default 5)")
    _flag(p, "health_stall_seconds", type=float,
          help="/health is 503 when a busy engine made no progress this long (default 60)")
    _flag(p, "log_level", choices=["critical", "error", "warning", "info", "debug"],
          help="log level (default info)")
    _flag(p, "manifest", type=Path, help="models.yaml (default <models_dir>/models.yaml)")
    _flag(p, "allow_symlinks", action="store_true",
          help="serve symlinks in the models dir that point outside it (default: refused)")
    _flag(p, "max_loaded_models", type=int, help="models kept loaded at once, LRU (default 1)")
    _flag(p, "memory_budget", help="evict LRU models to stay under this estimate, e.g. 4GB")
    _flag(p, "idle_unload_seconds",
          help="unload a model idle this long, e.g. 300 or 5m (default never)")
    _flag(p, "api_key", action="append", metavar="KEY",
          help="require this API key (repeat for several; env LLMSERVE_API_KEY, comma-separated)")
    _flag(p, "api_key_file", type=Path, help="file of API keys, one per line (# comments)")
    _flag(p, "share_prompt_cache", action="store_true",
          help="with API keys: one prompt cache for all keys (default: each key reuses only "
               "the KV its own requests left; cache_salt still partitions)")
    _flag(p, "no_announce", action="store_true", help="do not announce the server on the LAN")
    _flag(p, "llama_server", type=Path,
          help="llama-server for `backend: llama_server` entries (default: $LLAMA_SERVER, "
               "PATH, or the one `llmserve install llama` built)")
    _flag(p, "backend_start_timeout", type=float,
          help="seconds a llama-server child may take to become healthy (default 120)")
    _flag(p, "backend_connect_timeout", type=float,
          help="seconds to connect to a backend server (default 10)")
    _flag(p, "backend_read_timeout", type=float,
          help="seconds a backend may go silent mid-request (default 600)")
    _flag(p, "peers", choices=["auto"],
          help="auto: send requests for models no local backend has to LAN peers that "
               "announce them (mDNS)")
    _flag(p, "peer_api_key", help="API key sent to peers (env LLMSERVE_PEER_API_KEY)")


def _discover_parser(sub: Any) -> None:
    p = sub.add_parser("discover", help="find llmserve servers on the LAN (mDNS)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cache_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="inspect or clear the prompt cache on disk")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    for name, text in (("stats", "entries and bytes on disk"), ("clear", "delete every entry")):
        c = csub.add_parser(name, help=text)
        _flag(c, "cache_dir", type=Path, help="prompt cache folder (default cache)")
        c.add_argument("--json", action="store_true", help="print JSON")


def cache(args: argparse.Namespace) -> int:
    """`cache stats` and `cache clear` (safe while a server uses the same folder)."""
    import json
    import shutil

    from llmserve.cache.store import DiskTier

    cache_dir: Path = args.cache_dir or Settings().cache_dir
    llama_disk = cache_dir / "llama_disk"
    disk = DiskTier(cache_dir / "kv", Settings().cache_disk_bytes)
    try:
        if args.cache_cmd == "clear":
            disk.clear()
            shutil.rmtree(llama_disk, ignore_errors=True)
        info = {
            "directory": str(cache_dir),
            "entries": len(disk),
            "bytes": disk.bytes,
            "llama_disk_bytes": sum(
                p.stat().st_size for p in llama_disk.rglob("*") if p.is_file()
            ) if llama_disk.is_dir() else 0,
        }
    finally:
        disk.close()
    if args.json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        for key, value in info.items():
            sys.stdout.write(f"{key:<17} {value}\n")
    return 0


def _install_parser(sub: Any) -> None:
    p = sub.add_parser("install", help="build helper programs (llama-server)")
    isub = p.add_subparsers(dest="install_what", required=True)
    llama = isub.add_parser(
        "llama", help="build llama-server from the pinned llama-cpp-python sdist (cached)")
    accel = llama.add_mutually_exclusive_group()
    accel.add_argument("--cpu", action="store_true", help="CPU only (default)")
    accel.add_argument("--cuda", action="store_true", help="with CUDA (-DGGML_CUDA=on)")
    accel.add_argument("--metal", action="store_true", help="with Metal (-DGGML_METAL=on)")
    _flag(llama, "output_dir", type=Path,
          help="build here (default ~/.cache/llmserve/llama-server/<version>-<flags>); a "
               "folder already holding build/bin/llama-server is reused")
    _flag(llama, "jobs", type=int, help="parallel compile jobs (default: CPU count)")


def _llama_parser(sub: Any) -> None:
    p = sub.add_parser(
        "llama", help="run a llama.cpp tool that `install llama` built",
        description="Run a llama.cpp tool from the `llmserve install llama` build: TOOL "
                    "`server` is llama-server (generally llama-TOOL, or the binary's exact "
                    "name); ARGS go to it unchanged and its exit code is ours. Example: "
                    "llmserve llama server --version")
    p.add_argument("tool", metavar="TOOL")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI."""
    parser = argparse.ArgumentParser(prog="llmserve", description="local OpenAI-compatible server")
    parser.add_argument("--version", action="version", version=f"llmserve {__version__}")
    sub = parser.add_subparsers(dest="command")
    _serve_parser(sub)
    add_models_parser(sub, _flag)
    _cache_parser(sub)
    _discover_parser(sub)
    _install_parser(sub)
    _llama_parser(sub)
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

    from llmserve.backends.checks import backend_names, check_backends
    from llmserve.catalog.library import ModelLibrary
    from llmserve.catalog.manifest import ManifestError
    from llmserve.chat.templates import load_override
    from llmserve.errors import LlmserveError
    from llmserve.http.app import create_app

    try:
        library = ModelLibrary(
            settings.models_dir, settings.manifest, allow_symlinks=settings.allow_symlinks
        )
        library.catalog()  # a bad models.yaml stops the start, with its line and field
        check_backends(library, settings)
        if settings.model_name not in backend_names(library):
            library.resolve(settings.model_name)
    except ManifestError as exc:
        return _fail("; ".join(exc.lines()))
    except LlmserveError as exc:
        return _fail(f"{exc.message} (models dir: {settings.models_dir})")
    if settings.chat_template:
        try:
            load_override(settings.chat_template, settings.templates_dir)
        except LlmserveError as exc:
            return _fail(exc.message)
    app = create_app(settings)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        **_http_protocol(settings),
        # NOTE: uvicorn takes whole seconds here; round up so 0.5 is not "no timeout"
        timeout_keep_alive=max(1, math.ceil(settings.timeout_keep_alive)),
        timeout_graceful_shutdown=math.ceil(settings.timeout_graceful_shutdown),
    )
    return 0


def _http_protocol(settings: Settings) -> dict[str, Any]:
    """uvicorn's HTTP protocol with the header deadline and size cap (httptools), or h11 with
    its size cap only when httptools is missing."""
    try:
        from llmserve.http.protocol import guarded_protocol
    except ImportError:
        logger.warning("httptools is not installed: --timeout_headers is not enforced")
        return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes}
    return {"http": guarded_protocol(settings.timeout_headers, settings.max_header_bytes)}


def models(args: argparse.Namespace) -> int:
    """`models list|pull|verify|info|suggest|rm` (llmserve/catalog/cli_models.py)."""
    defaults = Settings()
    args.manifest = args.manifest or defaults.manifest
    return run_models(args, args.models_dir or defaults.models_dir, defaults.templates_dir)


def discover(args: argparse.Namespace) -> int:
    """`discover`: the llmserve servers that answer on the LAN, as a table or JSON."""
    import json

    from llmserve.discovery import discover as find

    try:
        nodes = find(args.timeout)
    except OSError as exc:  # NOTE: no multicast-capable interface, or the port is refused
        return _fail(f"cannot browse the LAN over mDNS: {exc}", 1)
    if args.json:
        sys.stdout.write(json.dumps([n.to_json() for n in nodes], indent=2) + "\n")
        return 0
    if not nodes:
        sys.stderr.write(f"no llmserve servers answered within {args.timeout:g} s\n")
        return 0
    rows = [("NAME", "ADDRESS", "PORT", "MODEL", "MODELS", "VERSION", "KEY")]
    rows += [
        (n.name, ",".join(n.addresses), str(n.port), n.model or "-", ",".join(n.models) or "-",
         n.version, "yes" if n.auth else "no")
        for n in nodes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llmserve` console script."""
    from llmserve.private import restrict_umask

    # NOTE: everything every command writes (downloads, caches, builds) is owner-only
    restrict_umask()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "llama" and argv[1] not in ("-h", "--help"):
        from llmserve.backends.install import run_tool

        # NOTE: before argparse, which would take the tool's own options (--version) as ours
        return run_tool(argv[1], argv[2:])
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
        if settings.log_level != "debug":
            # NOTE: httpx logs every proxied request and health poll at INFO
            logging.getLogger("httpx").setLevel(logging.WARNING)
        return serve(settings)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    if args.command == "cache":
        return cache(args)
    if args.command == "discover":
        return discover(args)
    if args.command == "llama":  # only reached without ARGS parsed above: `llama TOOL`
        from llmserve.backends.install import run_tool

        return run_tool(args.tool, args.args)
    if args.command == "install":
        from llmserve.backends.install import run_install

        return run_install(args)
    return models(args)
