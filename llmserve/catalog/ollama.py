"""Ollama's registry as a download source: `ollama://[namespace/]name[:tag]`.

The registry speaks the Docker distribution API: `GET {registry}/v2/{ns}/{name}/manifests/
{tag}` (Accept: the v2 manifest type) lists layers by media type and sha256 digest; the
`application/vnd.ollama.image.model` layer is the GGUF file, fetched from `/v2/{ns}/{name}/
blobs/{digest}` with resume (transfer.download, by digest, so a partial file is always safe to
continue) and checked against the digest. The small `.params` layer (JSON: temperature, top_k,
num_ctx, ...) becomes the entry's sampling and load defaults. The `.template` layer is a Go
template, which this server cannot render; the GGUF's own Jinja chat template is used instead.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from llmserve.catalog.spec import LOAD_PARAMS, SAMPLING_PARAMS, OllamaSource
from llmserve.catalog.transfer import FetchError, one_line, preflight, reason

DEFAULT_REGISTRY = "https://registry.ollama.ai"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_LAYER = "application/vnd.ollama.image.model"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
PARAMS_LAYER = "application/vnd.ollama.image.params"
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_SMALL_LAYER = 1 << 20  # template and params layers are a few hundred bytes
# Ollama parameter name -> (our field, load or sampling)
_PARAMS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "num_ctx": "n_ctx", "num_batch": "n_batch",
    "num_thread": "n_threads", "num_gpu": "n_gpu_layers",
}  # fmt: skip


def registry_url() -> str:
    """OLLAMA_REGISTRY, read at call time, or Ollama's public registry."""
    return (os.environ.get("OLLAMA_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")


@dataclass(frozen=True)
class OllamaModel:
    """What a registry manifest says: the GGUF blob and the defaults that came with it."""

    blob_url: str
    sha256: str
    size: int | None
    template: str | None = None
    load: dict[str, int] = field(default_factory=dict)
    sampling: dict[str, float] = field(default_factory=dict)


def _base(source: OllamaSource) -> str:
    quote = urllib.parse.quote
    return f"{registry_url()}/v2/{quote(source.namespace)}/{quote(source.name)}"


def _get(url: str, timeout: float, accept: str | None = None, limit: int = _SMALL_LAYER) -> bytes:
    headers = {"User-Agent": "llmserve", **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = bytes(response.read(limit + 1))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(one_line(str(exc.reason))) from exc
    except OSError as exc:
        raise FetchError(reason(exc)) from exc
    if len(data) > limit:
        raise FetchError(f"{url} is larger than {limit} bytes")
    return data


def resolve(source: OllamaSource, timeout: float) -> OllamaModel:
    """Read the registry manifest of source (fails fast when the registry is unreachable)."""
    base = _base(source)
    preflight(base, timeout)
    url = f"{base}/manifests/{urllib.parse.quote(source.tag)}"
    try:
        raw = _get(url, timeout, accept=MANIFEST_TYPE)
    except FetchError as exc:
        if str(exc).startswith("HTTP 404"):
            raise FetchError(f"{source.ref} is not in {registry_url()} (HTTP 404)") from exc
        raise
    try:
        manifest = json.loads(raw)
        layers = [x for x in manifest["layers"] if isinstance(x, dict)]
    except (ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"the registry's manifest of {source.ref} is not valid JSON") from exc
    model = next((x for x in layers if x.get("mediaType") == MODEL_LAYER), None)
    if model is None:
        raise FetchError(f"{source.ref} has no model layer ({MODEL_LAYER})")
    digest = _DIGEST.match(str(model.get("digest", "")))
    if digest is None:
        raise FetchError(f"{source.ref}: the model layer has no sha256 digest")
    size = model.get("size")
    template = _small_layer(base, layers, TEMPLATE_LAYER, timeout)
    load, sampling = _defaults(_small_layer(base, layers, PARAMS_LAYER, timeout))
    return OllamaModel(
        blob_url=f"{base}/blobs/sha256:{digest.group(1)}",
        sha256=digest.group(1),
        size=size if isinstance(size, int) and size >= 0 else None,
        template=template,
        load=load,
        sampling=sampling,
    )


def _small_layer(base: str, layers: list[dict[str, Any]], media: str, timeout: float) -> str | None:
    """The text of a template/params layer; None when absent or unreadable (optional)."""
    layer = next((x for x in layers if x.get("mediaType") == media), None)
    if layer is None or not _DIGEST.match(str(layer.get("digest", ""))):
        return None
    try:
        return _get(f"{base}/blobs/{layer['digest']}", timeout).decode("utf-8")
    except (FetchError, UnicodeDecodeError):
        return None


def _defaults(params: str | None) -> tuple[dict[str, int], dict[str, float]]:
    """(load, sampling) defaults from a params layer's JSON (unknown keys, e.g. stop, skipped)."""
    try:
        data = json.loads(params) if params else {}
    except ValueError:
        return {}, {}
    load: dict[str, int] = {}
    sampling: dict[str, float] = {}
    for key, value in (data.items() if isinstance(data, dict) else []):
        ours = _PARAMS.get(key)
        if ours is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if ours in LOAD_PARAMS:
            load[ours] = int(value)
        elif ours in SAMPLING_PARAMS:
            sampling[ours] = value
    return load, sampling


def default_filename(source: OllamaSource) -> str:
    """The local file name of a pulled model: `name-tag.gguf` (namespace too if not library)."""
    stem = source.name if source.namespace == "library" else f"{source.namespace}-{source.name}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{stem}-{source.tag}") + ".gguf"
