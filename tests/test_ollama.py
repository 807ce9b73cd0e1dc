"""`ollama://` pulls against a fake Ollama registry on 127.0.0.1: manifest, blob with resume,
digest check, params into the manifest entry, 404s, an unreachable registry."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from llmserve.catalog.manifest import load_manifest, parse_manifest, parse_ollama_ref
from llmserve.catalog.ollama import MANIFEST_TYPE, MODEL_LAYER, PARAMS_LAYER, TEMPLATE_LAYER
from llmserve.catalog.sources import FetchError, ModelSpec, fetch, partial_path
from llmserve.catalog.spec import OllamaSource
from llmserve.cli import main
from tests.fakehttp import range_start, send_ranged, serving

BLOB = bytes(range(256)) * 9_000  # ~2.2 MiB: several chunks
PARAMS = json.dumps({"temperature": 0.6, "top_k": 30, "num_ctx": 8192, "stop": ["<|im_end|>"]})
TEMPLATE = "{{ .System }}{{ .Prompt }}"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    port: int = 0
    body: bytes = BLOB
    advertised: str = digest(BLOB)  # the model layer's digest in the manifest
    cut_after: int | None = None  # close the blob connection after this many bytes, once
    models: tuple[str, ...] = ("library/tiny:latest", "someone/tiny:q4")
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manifest(self) -> bytes:
        layers = [
            {"mediaType": MODEL_LAYER, "digest": self.advertised, "size": len(self.body)},
            {"mediaType": TEMPLATE_LAYER, "digest": digest(TEMPLATE.encode()),
             "size": len(TEMPLATE)},
            {"mediaType": PARAMS_LAYER, "digest": digest(PARAMS.encode()), "size": len(PARAMS)},
        ]  # fmt: skip
        return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "layers": layers}).encode()


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    blobs = {digest(x.encode()): x.encode() for x in (TEMPLATE, PARAMS)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, **headers: str) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            reg.requests.append({"path": self.path, **headers})
            parts = self.path.split("/")  # "", "v2", ns, name, kind, ref
            if len(parts) != 6 or parts[1] != "v2":
                self._send(404, b"{}")
                return
            _, _, ns, name, kind, ref = parts
            if kind == "manifests":
                if f"{ns}/{name}:{ref}" not in reg.models:
                    self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                    return
                self._send(200, reg.manifest(), Content_Type=MANIFEST_TYPE)
                return
            if ref in blobs:
                self._send(200, blobs[ref])
                return
            if ref != reg.advertised:
                self._send(404, b"{}")
                return
            cut, reg.cut_after = reg.cut_after, None
            send_ranged(self, reg.body, range_start(self), cut)  # NOTE: no ETag: named by digest

    return Handler


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    state = FakeRegistry()
    with serving(_handler(state), monkeypatch) as state.port:
        monkeypatch.setenv("OLLAMA_REGISTRY", state.url)
        yield state


def spec(source: OllamaSource | None = None, sha256: str | None = None) -> ModelSpec:
    return ModelSpec("tiny", "tiny-latest.gguf", sha256, None, "",
                     (source or OllamaSource("tiny"),))


def test_refs() -> None:
    assert parse_ollama_ref("ollama://tiny") == OllamaSource("tiny", "library", "latest")
    assert parse_ollama_ref("someone/qwen2.5:0.5b-q4") == OllamaSource(
        "qwen2.5", "someone", "0.5b-q4")
    with pytest.raises(ValueError):
        parse_ollama_ref("ollama://a/b/c")


def test_pull_reads_manifest_and_blob(registry: FakeRegistry, tmp_path: Path) -> None:
    path = fetch(spec(), tmp_path, progress=False)
    assert path.read_bytes() == BLOB
    manifest_req = registry.requests[0]
    assert manifest_req["path"] == "/v2/library/tiny/manifests/latest"
    assert manifest_req["accept"] == MANIFEST_TYPE
    assert registry.requests[-1]["path"] == f"/v2/library/tiny/blobs/{digest(BLOB)}"
    assert not partial_path(tmp_path, "tiny-latest.gguf").exists()


def test_interrupted_blob_resumes(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.cut_after = 1_000_000
    with pytest.raises(FetchError, match="resume"):
        fetch(spec(), tmp_path, progress=False)
    partial = partial_path(tmp_path, "tiny-latest.gguf")
    assert partial.stat().st_size == 1_000_000
    path = fetch(spec(), tmp_path, progress=False)
    assert path.read_bytes() == BLOB
    assert registry.requests[-1]["range"] == "bytes=1000000-"


def test_bad_digest_is_rejected(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.advertised = digest(b"something else")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(spec(), tmp_path, progress=False)
    assert not (tmp_path / "tiny-latest.gguf").exists()
    assert not partial_path(tmp_path, "tiny-latest.gguf").exists()  # never resumed from


def test_catalog_sha256_must_match_the_registry(registry: FakeRegistry, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="the catalog expects"):
        fetch(spec(sha256="0" * 64), tmp_path, progress=False)


def test_unknown_model_is_a_404(registry: FakeRegistry, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"library/nope:latest is not in .*HTTP 404"):
        fetch(spec(OllamaSource("nope")), tmp_path, progress=False)


def test_unreachable_registry_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLAMA_REGISTRY", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"cannot reach 127\.0\.0\.1:9"):
        fetch(spec(), tmp_path, progress=False, timeout=5)
    assert time.monotonic() - start < 30  # generous: never the 20 s per attempt of a hang


def test_cli_pull_writes_entry_with_params(
    registry: FakeRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mdir = tmp_path / "models"
    code = main(["models", "pull", "ollama://someone/tiny:q4", "--models_dir", str(mdir),
                 "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert (mdir / "someone-tiny-q4.gguf").read_bytes() == BLOB
    entry = load_manifest(mdir / "models.yaml")["someone-tiny-q4"]
    assert entry.sha256 == digest(BLOB).removeprefix("sha256:") and entry.size == len(BLOB)
    assert dict(entry.sampling) == {"temperature": 0.6, "top_k": 30}
    assert dict(entry.load) == {"n_ctx": 8192}
    assert list(entry.sources) == [OllamaSource("tiny", "someone", "q4")]
    # the written entry pulls again from its source (already present: nothing downloaded)
    n = len(registry.requests)
    assert main(["models", "pull", "someone-tiny-q4", "--models_dir", str(mdir), "--quiet"]) == 0
    assert len(registry.requests) == n


def test_manifest_takes_ollama_sources(tmp_path: Path) -> None:
    specs = parse_manifest(
        "models:\n  q:\n    path: q.gguf\n    download:\n      - ollama: qwen2.5:0.5b\n",
        tmp_path / "models.yaml",
    )
    assert specs["q"].sources == (OllamaSource("qwen2.5", "library", "0.5b"),)
