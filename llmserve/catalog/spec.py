"""Catalog entries: a model file, what to know about it, and where it can be fetched from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def hf_path_problem(repo_id: str, filename: str) -> str | None:
    """Why a Hub repo id / file path cannot go into a URL (`.`, `..` or empty segments, a
    repo id that is not owner/name), or None."""
    if len(repo_id.split("/")) != 2:
        return f"Hugging Face repo id {repo_id!r} is not owner/name"
    for what, path in (("repo id", repo_id), ("file path", filename)):
        if any(part in ("", ".", "..") for part in path.split("/")):
            return (f"Hugging Face {what} {path!r} has an empty, `.` or `..` segment")
        if "\\" in path or "\0" in path:
            return f"Hugging Face {what} {path!r} holds a backslash or NUL"
    return None


@dataclass(frozen=True)
class HuggingFaceSource:
    """A file in a Hugging Face model repository; a path that could leave the repository in
    the URL (hf_path_problem) is a ValueError here, before any network."""

    repo_id: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        problem = hf_path_problem(self.repo_id, self.filename)
        if problem is not None:
            raise ValueError(problem)


@dataclass(frozen=True)
class PypiSource:
    """Wheels on PyPI ("name==version" specs) whose members, concatenated in order, are the file."""

    packages: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(frozen=True)
class UrlSource:
    """A plain http(s) or file URL."""

    url: str


@dataclass(frozen=True)
class LocalSource:
    """A file on this machine, hard-linked (or copied) into the models dir."""

    path: Path


@dataclass(frozen=True)
class OllamaSource:
    """A model in an Ollama registry (`ollama://[namespace/]name[:tag]`): its model layer."""

    name: str
    namespace: str = "library"
    tag: str = "latest"

    @property
    def ref(self) -> str:
        """`namespace/name:tag`."""
        return f"{self.namespace}/{self.name}:{self.tag}"


Source = HuggingFaceSource | PypiSource | UrlSource | LocalSource | OllamaSource

# Where an entry's requests run (issue 11): in-process, a llama-server child, a remote server.
BACKENDS = ("llama_cpp", "llama_server", "openai")


@dataclass(frozen=True)
class BackendSpec:
    """An entry's backend: llama_cpp (in-process), llama_server (a child llmserve starts),
    or openai (a remote OpenAI-compatible server). `line` is the manifest line of `backend:`."""

    kind: str = "llama_cpp"
    base_url: str | None = None  # openai
    api_key_env: str | None = None  # openai: the environment variable holding its key
    upstream_model: str | None = None  # openai: the name sent upstream (default: the alias)
    args: tuple[str, ...] = ()  # llama_server: extra command-line arguments
    line: int | None = None


LOCAL = BackendSpec()

# Load settings a catalog entry may set per model (the server's flags are the fallback).
LOAD_PARAMS = ("n_ctx", "n_gpu_layers", "n_threads", "n_batch", "cache_type_k", "cache_type_v",
               "flash_attn", "draft", "draft_model", "draft_max", "draft_min")
# Request sampling fields a catalog entry may give defaults for.
SAMPLING_PARAMS = (
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry: a model file and the places it can be fetched from, tried in order.

    `size` is the exact byte count (checked after a download); `size_label` is a display-only
    approximation for entries whose exact size is not known.
    """

    alias: str
    filename: str
    sha256: str | None
    size: int | None
    description: str
    sources: tuple[Source, ...]
    size_label: str | None = None
    use_cases: tuple[str, ...] = ()
    chat_template: str | None = None
    load: Mapping[str, int] = field(default_factory=dict)
    sampling: Mapping[str, float] = field(default_factory=dict)
    origin: str = "builtin"  # "builtin", or the manifest path it came from
    aliases: tuple[str, ...] = ()  # more names clients may send (e.g. "gpt-4o-mini")
    backend: BackendSpec = LOCAL  # openai entries have no file: filename is ""

    @property
    def names(self) -> tuple[str, ...]:
        """The alias and every extra alias."""
        return (self.alias, *self.aliases)


def describe_source(source: Source) -> str:
    """A short human-readable label for a source."""
    if isinstance(source, HuggingFaceSource):
        rev = "" if source.revision == "main" else f"@{source.revision}"
        return f"huggingface {source.repo_id}/{source.filename}{rev}"
    if isinstance(source, PypiSource):
        return "pypi " + " ".join(source.packages)
    if isinstance(source, LocalSource):
        return f"local {source.path}"
    if isinstance(source, OllamaSource):
        return f"ollama {source.ref}"
    return f"url {source.url}"


def source_to_dict(source: Source) -> dict[str, Any]:
    """A source as its models.yaml `download` item."""
    if isinstance(source, HuggingFaceSource):
        hf: dict[str, Any] = {"repo_id": source.repo_id, "filename": source.filename}
        if source.revision != "main":
            hf["revision"] = source.revision
        return {"huggingface": hf}
    if isinstance(source, PypiSource):
        members: dict[str, Any] = (
            {"member": source.members[0]}
            if len(source.members) == 1
            else {"members": list(source.members)}
        )
        return {"pypi": {"packages": list(source.packages), **members}}
    if isinstance(source, LocalSource):
        return {"local": str(source.path)}
    if isinstance(source, OllamaSource):
        return {"ollama": source.ref}
    return {"url": source.url}


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """A spec as its models.yaml entry (empty fields left out)."""
    entry: dict[str, Any] = {"path": spec.filename} if spec.filename else {}
    if spec.backend.kind != "llama_cpp":
        b = spec.backend
        entry["backend"] = b.kind
        for key in ("base_url", "api_key_env", "upstream_model"):
            if getattr(b, key) is not None:
                entry[key] = getattr(b, key)
        if b.args:
            entry["args"] = list(b.args)
    if spec.aliases:
        entry["aliases"] = list(spec.aliases)
    if spec.description:
        entry["description"] = spec.description
    if spec.size is not None:
        entry["size"] = spec.size
    elif spec.size_label:
        entry["size"] = spec.size_label
    if spec.use_cases:
        entry["use_cases"] = list(spec.use_cases)
    if spec.chat_template:
        entry["chat_template"] = spec.chat_template
    if spec.load:
        entry["load"] = dict(spec.load)
    if spec.sampling:
        entry["sampling"] = dict(spec.sampling)
    entry["sha256"] = spec.sha256
    entry["download"] = [source_to_dict(s) for s in spec.sources]
    return entry
