"""The models a server or CLI knows: built-in catalog + models.yaml + GGUF files in the dir.

Names resolve to a file in the models directory: a file name (with or without `.gguf`), or an
alias from the catalog. Files that no catalog entry names are still listed and servable.
A symlink whose real path leaves the models directory is neither listed nor served unless
`allow_symlinks` is set (--allow_symlinks): the models dir is the boundary of what a client
can make the server open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.catalog.builtin import BUILTIN
from llmserve.catalog.gguf_info import GGUFError, GGUFInfo, quant_from_filename, read_gguf
from llmserve.catalog.manifest import MANIFEST_NAME, ManifestError, load_manifest
from llmserve.catalog.spec import ModelSpec
from llmserve.chat.templates import FAMILY_TEMPLATES
from llmserve.errors import InvalidModelError, InvalidModelNameError, ModelNotFoundError
from llmserve.units import parse_size

logger = logging.getLogger(__name__)

# Words people use for one use case; `suggest` matches any spelling against any tag.
USE_CASE_SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"chat", "conversational", "conversation", "assistant", "chatbot", "instruct",
               "dialogue", "dialog"}),
    frozenset({"code", "coding", "programming", "coder", "developer"}),
    frozenset({"tools", "tool", "tool-use", "tool_use", "function-calling", "function_calling",
               "functions", "agent", "agents", "agentic"}),
    frozenset({"completion", "completions", "text-completion", "autocomplete", "base"}),
    frozenset({"tiny", "small", "fast", "lightweight", "cpu"}),
    frozenset({"testing", "test", "tests", "ci"}),
    frozenset({"embedding", "embeddings", "embed", "retrieval", "rag", "search"}),
    frozenset({"vision", "image", "images", "multimodal"}),
    frozenset({"reasoning", "thinking", "math"}),
    frozenset({"multilingual", "translation", "translate"}),
)  # fmt: skip


def use_case_terms(use_case: str) -> frozenset[str]:
    """A use-case word and its synonyms, case-folded ("conversational" -> {"chat", ...})."""
    wanted = use_case.strip().casefold()
    for group in USE_CASE_SYNONYMS:
        if wanted in group:
            return group
    return frozenset({wanted})


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file in the models directory."""

    name: str
    size: int


@dataclass(frozen=True)
class ModelEntry:
    """A model the library knows: a catalog entry, a file in the dir, or both."""

    filename: str
    spec: ModelSpec | None
    present: bool
    size: int | None

    @property
    def alias(self) -> str | None:
        """The catalog alias, if any."""
        return self.spec.alias if self.spec else None


def inside(path: Path, root: Path) -> bool:
    """Whether path's real location (symlinks followed) is within root's."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def scan_models_dir(
    models_dir: Path, *, allow_symlinks: bool = False
) -> tuple[list[ModelFile], list[str]]:
    """(GGUF files servable from the dir, names refused as symlinks that leave it)."""
    if not models_dir.is_dir():
        return [], []
    files: list[ModelFile] = []
    refused: list[str] = []
    for p in sorted(models_dir.iterdir()):
        if p.suffix != ".gguf" or p.name.startswith("."):
            continue
        if p.is_symlink() and not allow_symlinks and not inside(p, models_dir):
            refused.append(p.name)
            continue
        try:
            if p.is_file():
                files.append(ModelFile(p.name, p.stat().st_size))
        except OSError:
            continue
    return files, refused


def list_model_files(models_dir: Path, *, allow_symlinks: bool = False) -> list[ModelFile]:
    """Every GGUF in the models dir, sorted by name (hidden and partial files skipped, and
    symlinks out of the dir unless allowed)."""
    return scan_models_dir(models_dir, allow_symlinks=allow_symlinks)[0]


def check_model_name(name: str) -> None:
    """400 for names that could leave the models directory or name a hidden file."""
    if not name or any(c in name for c in "/\\\0") or name.startswith(".") or ".." in name:
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use an alias or a file name from the models directory",
            param="model",
        )


class ModelLibrary:
    """Catalog (built-in, overlaid per alias by models.yaml) plus the models directory."""

    def __init__(
        self,
        models_dir: Path,
        manifest: Path | None = None,
        *,
        templates_dir: Path | None = None,
        strict: bool = True,
        allow_symlinks: bool = False,
    ):
        self.models_dir = models_dir
        self.allow_symlinks = allow_symlinks
        self.manifest_path = manifest or models_dir / MANIFEST_NAME
        self.templates_dir = templates_dir
        # strict: a bad models.yaml raises (CLI); otherwise it is logged and ignored (server).
        self.strict = strict
        self._manifest_key: tuple[int, int] | None = None
        self._manifest: dict[str, ModelSpec] = {}
        self._gguf: dict[str, tuple[tuple[int, int], GGUFInfo | None]] = {}

    # --- catalog ------------------------------------------------------------------------------

    def manifest(self) -> dict[str, ModelSpec]:
        """models.yaml entries, re-read when the file changes."""
        try:
            st = self.manifest_path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._manifest_key or key is None:
            try:
                self._manifest = load_manifest(self.manifest_path)
            except ManifestError as exc:
                if self.strict:
                    raise
                logger.error("ignoring invalid %s:\n%s", self.manifest_path, exc)
                self._manifest = {}
            self._manifest_key = key
        return self._manifest

    def catalog(self) -> dict[str, ModelSpec]:
        """Alias -> spec: models.yaml entries first, then built-in ones it does not override.

        NOTE: entries on other backends (llama_server, openai) are left out: they answer to
        their aliases only, through the backend pool; see backend_specs."""
        manifest = {a: s for a, s in self.manifest().items() if s.backend.kind == "llama_cpp"}
        return {**manifest, **{a: s for a, s in BUILTIN.items() if a not in self.manifest()}}

    def backend_specs(self) -> dict[str, ModelSpec]:
        """models.yaml entries served by another backend than the in-process engine."""
        return {a: s for a, s in self.manifest().items() if s.backend.kind != "llama_cpp"}

    def find_spec(self, name: str) -> ModelSpec | None:
        """The catalog entry whose alias or file name is name (exact, then case-insensitive)."""
        name = name.strip()
        specs = list(self.catalog().values())
        for spec in specs:
            if name in (*spec.names, spec.filename):
                return spec
        folded = name.casefold()
        for spec in specs:
            if folded in {n.casefold() for n in (*spec.names, spec.filename)}:
                return spec
        return None

    def served_aliases(self) -> list[tuple[str, str]]:
        """(extra alias, file) for catalog entries whose file is present, for /v1/models."""
        present = {f.name for f in self.files()}
        out: dict[str, str] = {}
        for spec in self.catalog().values():
            if spec.filename in present:
                for alias in spec.aliases:
                    out.setdefault(alias, spec.filename)
        return list(out.items())

    def spec_for_file(self, filename: str) -> ModelSpec | None:
        """The catalog entry for a file in the models dir (manifest entries win)."""
        return next((s for s in self.catalog().values() if s.filename == filename), None)

    def entries(self) -> list[ModelEntry]:
        """Catalog entries (present or not), then files in the dir no entry names."""
        present = {f.name: f.size for f in self.files()}
        out: list[ModelEntry] = []
        named: set[str] = set()
        for spec in self.catalog().values():
            if spec.filename in named:
                continue  # two aliases for one file: the first (manifest) wins
            named.add(spec.filename)
            size = present.get(spec.filename, spec.size)
            out.append(ModelEntry(spec.filename, spec, spec.filename in present, size))
        out += [ModelEntry(n, None, True, s) for n, s in present.items() if n not in named]
        return out

    def files(self) -> list[ModelFile]:
        """The GGUF files this library serves from the models dir."""
        return list_model_files(self.models_dir, allow_symlinks=self.allow_symlinks)

    # --- names --------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """A request's model name (alias or file name) to a file in the dir; 400/404 otherwise."""
        check_model_name(name)
        listed, refused = scan_models_dir(self.models_dir, allow_symlinks=self.allow_symlinks)
        files = [f.name for f in listed]
        spec = self.find_spec(name)
        for candidate in (name, f"{name}.gguf", spec.filename if spec else None):
            if candidate in refused:
                raise self._outside(name)
            if candidate in files:
                return candidate
        if spec is not None:
            raise ModelNotFoundError(
                f"model {name!r} ({spec.filename}) is not downloaded; run "
                f"`llmserve models pull {spec.alias}`",
                param="model",
            )
        folded = [f for f in files if name.casefold() in (f.casefold(), f[:-5].casefold())]
        if len(folded) == 1:
            return folded[0]
        available = self._available_names(files)
        raise ModelNotFoundError(
            f"model {name!r} not found; available: {', '.join(available) or 'none'}",
            param="model",
        )

    def _outside(self, name: str) -> InvalidModelError:
        return InvalidModelError(
            f"model {name!r} is a symlink to a file outside the models directory; start the "
            "server with --allow_symlinks to serve such files",
            param="model",
        )

    def check_inside(self, filename: str) -> None:
        """400 when filename's real path leaves the models dir (unless symlinks are allowed)."""
        if not self.allow_symlinks and not inside(self.models_dir / filename, self.models_dir):
            raise self._outside(filename)

    def check_loadable(self, filename: str) -> None:
        """400 unless filename is a servable GGUF: inside the models dir (symlinks followed,
        unless allowed) with a readable, complete header. Runs before anything is evicted."""
        self.check_inside(filename)
        path = self.models_dir / filename
        try:
            info: GGUFInfo | None = read_gguf(path)
        except GGUFError as exc:
            # NOTE: GGUFError names the file, never the server's path.
            raise InvalidModelError(
                f"model {filename!r} is not a loadable GGUF file: {exc}", param="model"
            ) from exc
        if info is not None and info.truncated:
            raise InvalidModelError(
                f"model {filename!r} is not a loadable GGUF file: it has {info.file_size} bytes "
                f"but its tensors need {info.required_size} (an incomplete download?)",
                param="model",
            )

    def _available_names(self, files: list[str]) -> list[str]:
        aliases = {s.filename: s.alias for s in reversed(list(self.catalog().values()))}
        return [f"{aliases[f]} ({f})" if f in aliases else f for f in files]

    # --- metadata -----------------------------------------------------------------------------

    def gguf(self, filename: str) -> GGUFInfo | None:
        """The GGUF header of a present file (cached until the file changes); None if unreadable."""
        path = self.models_dir / filename
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._gguf.get(filename)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            info: GGUFInfo | None = read_gguf(path)
        except GGUFError as exc:
            logger.warning("%s", exc)
            info = None
        self._gguf[filename] = (key, info)
        return info

    def has_template(self, filename: str, info: GGUFInfo | None) -> bool | None:
        """Whether chat requests can be rendered for this model (None: unknown, not present)."""
        spec = self.spec_for_file(filename)
        if spec is not None and spec.chat_template:
            return True
        if self.templates_dir is not None:
            candidates = [self.templates_dir / f"{Path(filename).stem}.jinja"]
            family = FAMILY_TEMPLATES.get(info.architecture or "") if info else None
            if family:
                candidates.append(self.templates_dir / f"{family}.jinja")
            if any(p.is_file() for p in candidates):
                return True
        if info is None:
            return None
        return info.chat_template is not None

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        """The facts `list` and GET /models show for one model."""
        info = self.gguf(entry.filename) if entry.present else None
        spec = entry.spec
        return {
            "name": entry.filename,
            "alias": entry.alias,
            "file": entry.filename,
            "size": entry.size,
            "size_label": spec.size_label if spec and entry.size is None else None,
            "present": entry.present,
            "arch": info.architecture if info else None,
            "parameters": info.parameters if info else None,
            "quant": info.quantization if info else quant_from_filename(entry.filename),
            "context_length": info.context_length if info else None,
            "has_template": self.has_template(entry.filename, info),
            "description": spec.description if spec else (info.name if info else None) or "",
            "use_cases": list(spec.use_cases) if spec else [],
        }

    def suggest(self, use_case: str) -> list[ModelEntry]:
        """Entries tagged with use_case or a synonym of it (`use_case_terms`): downloaded ones
        first, then smallest first."""
        terms = use_case_terms(use_case)
        matches = [
            e for e in self.entries()
            if e.spec and any(u.casefold() in terms for u in e.spec.use_cases)
        ]  # fmt: skip

        def order(e: ModelEntry) -> tuple[bool, int]:
            size = e.size
            if size is None and e.spec and e.spec.size_label:
                size = parse_size(e.spec.size_label)
            return (not e.present, size if size is not None else 1 << 62)

        return sorted(matches, key=order)

    def use_cases(self) -> list[str]:
        """Every use-case tag in the catalog."""
        return sorted({u for s in self.catalog().values() for u in s.use_cases})
