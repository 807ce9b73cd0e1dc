"""Pieces of the fake download servers (Hugging Face, Ollama registry) the tests run."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def range_start(handler: BaseHTTPRequestHandler) -> int:
    """Where a `Range: bytes=N-` request starts (0 without one)."""
    rng = handler.headers.get("Range")
    return int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0


def send_ranged(handler: BaseHTTPRequestHandler, body: bytes, start: int,
                cut_after: int | None, headers: dict[str, str] | None = None) -> None:
    """body from start (206 with Content-Range when start > 0); with cut_after, only that
    many bytes and then the connection is shut (a download cut mid-way)."""
    part = body[start:]
    handler.send_response(206 if start else 200)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    handler.send_header("Content-Length", str(len(part)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    if cut_after is not None:
        handler.wfile.write(part[:cut_after])
        handler.wfile.flush()
        handler.connection.shutdown(2)
        return
    handler.wfile.write(part)


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler], monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[int]:
    """Run handler on a 127.0.0.1 port (yielded) in a thread, with no proxy in the way."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
