"""Hugging Face and URL downloads against a local fake Hub: resume, validators, auth, errors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from llmserve.catalog.sources import (
    FetchError,
    HuggingFaceSource,
    ModelSpec,
    UrlSource,
    fetch,
    partial_path,
)
from llmserve.catalog.transfer import meta_path
from tests.fakehttp import range_start, send_ranged, serving

BLOB = bytes(range(256)) * 12_000  # ~3 MiB: several 1 MiB chunks
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
REPO = "someone/tiny-GGUF"
REMOTE_NAME = "Tiny-Q4_K_M.gguf"
LOCAL_NAME = "tiny-q4_k_m.gguf"


@dataclass
class FakeHub:
    """What the fake Hub serves and what it saw."""

    port: int = 0
    body: bytes = BLOB
    etag: str = '"v1"'
    cut_after: int | None = None  # close the connection after this many body bytes, once
    redirect_host: str | None = None  # answer /resolve/ with a 302 to this host's /cdn/
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.requests.append({"path": self.path, **headers})
            resolve = f"/{REPO}/resolve/main/{REMOTE_NAME}"
            if self.path == resolve and hub.redirect_host:
                self.send_response(302)
                self.send_header("Location", f"http://{hub.redirect_host}:{hub.port}/cdn/blob")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path not in (resolve, "/cdn/blob", "/plain/model.gguf"):
                self.send_error(404, "Entry not found")
                return
            start = range_start(self) if self.headers.get("If-Range") in (None, hub.etag) else 0
            cut, hub.cut_after = hub.cut_after, None
            send_ranged(self, hub.body, start, cut, {"ETag": hub.etag})

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    state = FakeHub()
    with serving(_handler(state), monkeypatch) as state.port:
        monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
        monkeypatch.setenv("HF_TOKEN", "secret-token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield state


def spec(sha256: str | None = BLOB_SHA, size: int | None = len(BLOB)) -> ModelSpec:
    return ModelSpec(
        alias="tiny", filename=LOCAL_NAME, sha256=sha256, size=size, description="",
        sources=(HuggingFaceSource(REPO, REMOTE_NAME),),
    )


def test_hf_download_verified_and_installed(hub: FakeHub, tmp_path: Path) -> None:
    path = fetch(spec(), tmp_path, progress=False)

    assert path == tmp_path / LOCAL_NAME
    assert path.read_bytes() == BLOB
    assert os.listdir(tmp_path) == [LOCAL_NAME]  # no partial, sidecar or lock left
    assert hub.requests[0]["path"] == f"/{REPO}/resolve/main/{REMOTE_NAME}"
    assert hub.requests[0]["authorization"] == "Bearer secret-token"


def test_interrupted_download_resumes_with_range(hub: FakeHub, tmp_path: Path) -> None:
    hub.cut_after = 1_500_000

    with pytest.raises(FetchError, match="resume"):
        fetch(spec(), tmp_path, progress=False)
    partial = partial_path(tmp_path, LOCAL_NAME)
    assert partial.stat().st_size == 1_500_000
    assert not (tmp_path / LOCAL_NAME).exists()

    path = fetch(spec(), tmp_path, progress=False)

    assert path.read_bytes() == BLOB
    second = hub.requests[-1]
    assert second["range"] == "bytes=1500000-"
    assert second["if-range"] == '"v1"'
    assert not partial.exists() and not meta_path(partial).exists()


def test_changed_file_restarts_instead_of_resuming(hub: FakeHub, tmp_path: Path) -> None:
    hub.cut_after = 1_000_000
    with pytest.raises(FetchError):
        fetch(spec(sha256=None), tmp_path, progress=False)
    hub.body = b"GGUF" + bytes(len(BLOB) - 4)  # same size, new content, new validator
    hub.etag = '"v2"'

    path = fetch(spec(sha256=None), tmp_path, progress=False)

    assert path.read_bytes() == hub.body  # not old bytes + new tail
    assert hub.requests[-1]["if-range"] == '"v1"'


def test_sha_mismatch_discards_the_partial(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(spec(sha256="0" * 64), tmp_path, progress=False)

    assert os.listdir(tmp_path) == []


def test_token_is_not_sent_across_hosts(hub: FakeHub, tmp_path: Path) -> None:
    hub.redirect_host = "localhost"  # another netloc than 127.0.0.1

    fetch(spec(), tmp_path, progress=False)

    first, cdn = hub.requests
    assert first["authorization"] == "Bearer secret-token"
    assert cdn["path"] == "/cdn/blob"
    assert "authorization" not in cdn


def test_missing_file_is_one_line(hub: FakeHub, tmp_path: Path) -> None:
    missing = ModelSpec("x", "x.gguf", None, None, "", (HuggingFaceSource(REPO, "nope.gguf"),))

    with pytest.raises(FetchError) as info:
        fetch(missing, tmp_path, progress=False)

    assert "HTTP 404" in str(info.value) and "\n" not in str(info.value)


def test_offline_mode_never_touches_the_network(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(FetchError, match="offline"):
        fetch(spec(), tmp_path, progress=False)
    assert hub.requests == []


def test_plain_url_source_resumes_too(hub: FakeHub, tmp_path: Path) -> None:
    source = UrlSource(f"{hub.endpoint}/plain/model.gguf")
    url_spec = ModelSpec("tiny", LOCAL_NAME, BLOB_SHA, len(BLOB), "", (source,))
    hub.cut_after = 2_000_000
    with pytest.raises(FetchError):
        fetch(url_spec, tmp_path, progress=False)

    assert fetch(url_spec, tmp_path, progress=False).read_bytes() == BLOB
    assert hub.requests[-1]["range"] == "bytes=2000000-"
    assert "authorization" not in hub.requests[-1]
