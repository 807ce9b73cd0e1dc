"""Resumable HTTP downloads (plain URLs and Hugging Face `resolve` URLs) and byte-copy helpers.

A download writes to a stable partial file next to its destination and records the URL and
the server's validator (ETag or Last-Modified) beside it. A later attempt asks for the rest
with `Range` + `If-Range`: a server whose file changed answers 200 and the download restarts.

NOTE: Hugging Face files are fetched over plain HTTPS from `{HF_ENDPOINT}/{repo}/resolve/
{revision}/{file}` instead of through huggingface_hub.hf_hub_download, because the latter
discards partial files (no resume) and retries an unreachable Hub for ~25 s.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Protocol

from tqdm import tqdm

from llmserve.catalog.spec import HuggingFaceSource
from llmserve.private import open_private, write_private

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_MAX_REASON_CHARS = 300
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_TOTAL_ONLY = re.compile(r"bytes\s+\*/(\d+)")


class FetchError(Exception):
    """A model file could not be fetched; the message is one line."""


# --- Hugging Face -----------------------------------------------------------------------------


def env_flag(name: str) -> bool:
    """Whether an environment variable is set to a true value, as huggingface_hub reads it."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on."""
    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")


def hf_endpoint() -> str:
    """The Hub's base URL: HF_ENDPOINT, read at call time, or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def hf_url(source: HuggingFaceSource) -> str:
    """The `resolve` URL of a file in a Hub repository."""
    quote = urllib.parse.quote
    return (
        f"{hf_endpoint()}/{quote(source.repo_id)}/resolve/"
        f"{quote(source.revision, safe='')}/{quote(source.filename)}"
    )


def hf_headers() -> dict[str, str]:
    """Authorization for gated repositories: HF_TOKEN or the token `hf auth login` saved."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        with suppress(Exception):  # NOTE: optional; a broken token file must not stop a pull
            from huggingface_hub import get_token

            token = get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def preflight(url: str, timeout: float) -> None:
    """Fail in seconds when a host can't be resolved or reached (no proxy in the way)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        return
    proxies = urllib.request.getproxies()
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(host):
        return  # the proxy may reach what we cannot; let the request try
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            pass
    except OSError as exc:
        raise FetchError(f"cannot reach {host}:{port}: {reason(exc)}") from exc


class _KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never send the Hub token to another host (the CDN)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != req.host:
            new.remove_header("Authorization")
        return new


# --- resumable download -----------------------------------------------------------------------


def meta_path(partial: Path) -> Path:
    """Where the validator of a partial download is kept."""
    return partial.with_name(partial.name + ".json")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def download(
    url: str,
    partial: Path,
    *,
    headers: dict[str, str] | None = None,
    timeout: float,
    progress: bool,
    size_hint: int | None = None,
    desc: str = "",
    immutable: bool = False,
) -> None:
    """Download url into partial, resuming what an earlier attempt left there.

    immutable: the URL names its content (an Ollama blob by digest), so a partial file is
    resumed even when the server sent no validator."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in {"http", "https", "file"}:
        raise FetchError(f"unsupported URL scheme {scheme!r}")
    meta = _read_meta(meta_path(partial))
    have = partial.stat().st_size if partial.is_file() else 0
    validator = meta.get("etag") or meta.get("last_modified")
    if have and (meta.get("url") != url or not (isinstance(validator, str) or immutable)):
        have = 0
    request_headers = {"User-Agent": "llmserve", **(headers or {})}
    if have:
        request_headers["Range"] = f"bytes={have}-"
        if isinstance(validator, str) and not immutable:
            request_headers["If-Range"] = validator
        logger.info("resuming %s at byte %d", desc or partial.name, have)
    opener = urllib.request.build_opener(_KeepAuthOnSameHost)
    request = urllib.request.Request(url, headers=request_headers)
    try:
        with opener.open(request, timeout=timeout) as response:
            total = _receive(response, url, partial, have, progress, size_hint, desc)
    except urllib.error.HTTPError as exc:
        with suppress(Exception):
            exc.close()
        if exc.code == 416 and have and _range_total(exc.headers) == have:
            return  # the partial file is already complete
        if exc.code == 416:
            partial.unlink(missing_ok=True)
        hint = " (gated or private repository? set HF_TOKEN)" if exc.code in (401, 403) else ""
        raise FetchError(f"HTTP {exc.code} {exc.reason}{hint}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(one_line(str(exc.reason))) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(f"{reason(exc)}; run the pull again to resume") from exc
    got = partial.stat().st_size
    if total is not None and got != total:
        raise FetchError(f"download interrupted at {got} of {total} bytes; pull again to resume")


def _receive(
    response: Any,
    url: str,
    partial: Path,
    have: int,
    progress: bool,
    size_hint: int | None,
    desc: str,
) -> int | None:
    """Write a response body to partial (appending for a 206); returns the expected total."""
    status = response.getcode()
    headers = response.headers
    if status == 206:
        match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != have:
            partial.unlink(missing_ok=True)
            raise FetchError("the server resumed at the wrong offset; pull again to restart")
        total = int(match.group(3)) if match.group(3) != "*" else None
        append = True
    else:
        length = headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        have, append = 0, False
    meta = {
        "url": url,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "total": total,
    }
    write_private(meta_path(partial), json.dumps(meta).encode("utf-8"))
    bar = progress_bar(total or size_hint, desc or partial.name, progress, initial=have)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    with os.fdopen(open_private(partial, flags), "ab" if append else "wb") as dst, bar:
        copy(response, dst, bar)
    return total


def _range_total(headers: Any) -> int | None:
    match = _TOTAL_ONLY.match((headers or {}).get("Content-Range", "") or "")
    return int(match.group(1)) if match else None


# --- helpers ----------------------------------------------------------------------------------


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def progress_bar(
    total: int | None, desc: str, enabled: bool, *, initial: int = 0
) -> tqdm[NoReturn]:
    """A byte progress bar on stderr; hidden when disabled or stderr is not a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if enabled else True,
    )


def copy(src: Readable, dst: BinaryIO, bar: tqdm[NoReturn]) -> int:
    """Copy src to dst in 1 MiB chunks, advancing bar; returns bytes copied."""
    written = 0
    while chunk := src.read(CHUNK_SIZE):
        dst.write(chunk)
        written += len(chunk)
        bar.update(len(chunk))
    return written


def one_line(text: str) -> str:
    """Whitespace folded, cut to a readable length."""
    line = " ".join(text.split())
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3] + "..."
    return line


def reason(exc: BaseException) -> str:
    """An exception as one short line, led by its type name."""
    text = one_line(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
