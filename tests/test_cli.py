"""CLI parsing, environment variables, and the missing-model exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.cli import _settings, build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_both_spellings_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_N_CTX", "1234")
    monkeypatch.setenv("LLMSERVE_PORT", "9100")
    args = build_parser().parse_args(["serve", "--model-name", "a.gguf", "--port", "9001"])
    s = _settings(args)
    assert (s.model_name, s.port, s.n_ctx) == ("a.gguf", 9001, 1234)
    args = build_parser().parse_args(["serve", "--model_name", "b.gguf", "--n-gpu-layers", "-1"])
    s = _settings(args)
    assert (s.model_name, s.port, s.n_gpu_layers) == ("b.gguf", 9100, -1)


def test_missing_model_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "here.gguf").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--model_name", "nope.gguf",
         "--models_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nope.gguf" in lines[0] and "here.gguf" in lines[0]
    assert "Traceback" not in proc.stderr


def test_invalid_setting_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve", "serve", "--port", "99999"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "port" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_chat_template_exits_2(tmp_path: Path) -> None:
    (tmp_path / "here.gguf").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--model_name", "here.gguf",
         "--models_dir", str(tmp_path), "--chat-template", "no-such-template"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "no-such-template" in proc.stderr and "Traceback" not in proc.stderr
    args = build_parser().parse_args(["serve", "--chat_template", "chatml"])
    assert _settings(args).chat_template == "chatml"


def test_fake_app_never_imports_llama_cpp(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from llmserve.config import Settings;"
        "from llmserve.http.app import create_app; from llmserve.engine.fake import FakeEngine;"
        f"create_app(Settings(models_dir=Path({str(tmp_path)!r})), "
        "engine_factory=lambda p, s: FakeEngine(p));"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_only_the_engine_package_imports_llama_cpp() -> None:
    importers = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "llmserve").rglob("*.py")
        if "import llama_cpp" in p.read_text() or "from llama_cpp" in p.read_text()
    )
    assert importers == ["llmserve/engine/batch.py", "llmserve/engine/draft_model.py",
                         "llmserve/engine/guidance.py",
                         "llmserve/engine/kvtypes.py", "llmserve/engine/llama.py",
                         "llmserve/engine/sampling.py", "llmserve/engine/vocab.py",
                         "llmserve/engine/weights.py"]


def test_cache_stats_and_clear(tmp_path: Path) -> None:
    from llmserve.cache.store import DiskTier

    disk = DiskTier(tmp_path / "kv", 1 << 30)
    disk.put("a", b"x" * 50_000)
    disk.put("b", b"y" * 10)
    disk.close()

    def run(cmd: str) -> dict[str, int]:
        proc = subprocess.run(
            [sys.executable, "-m", "llmserve", "cache", cmd, "--cache_dir", str(tmp_path),
             "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        import json

        return dict(json.loads(proc.stdout))

    before = run("stats")
    assert before["entries"] == 2 and before["bytes"] > 50_000
    after = run("clear")
    assert after["entries"] == 0
    assert run("stats")["entries"] == 0


def _llama(args: list[str], cache_home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["XDG_CACHE_HOME"] = str(cache_home)
    return subprocess.run([sys.executable, "-m", "llmserve", "llama", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_llama_runs_the_built_tool_with_its_args_and_exit_code(tmp_path: Path) -> None:
    from llmserve.backends import install

    none = _llama(["server", "--version"], tmp_path / "empty")
    assert none.returncode == 2 and "llmserve install llama" in none.stderr
    bin_dir = (tmp_path / "cache" / "llmserve" / "llama-server" /
               f"{install.pinned_version()}-cpu" / "build" / "bin")
    bin_dir.mkdir(parents=True)
    script = '#!/bin/sh\necho "$(basename "$0"):$#:$1|$2|$3"\nexit 7\n'
    for name in ("llama-server", "llama-cli", "rpc-server"):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    ran = _llama(["server", "--version", "a b", "-x"], tmp_path / "cache")
    assert (ran.returncode, ran.stdout) == (7, "llama-server:3:--version|a b|-x\n")
    assert _llama(["llama-cli"], tmp_path / "cache").stdout == "llama-cli:0:||\n"
    assert _llama(["rpc-server", "-p", "1"], tmp_path / "cache").stdout == "rpc-server:2:-p|1|\n"
    missing = _llama(["bench"], tmp_path / "cache")
    assert missing.returncode == 2 and "llama-cli, llama-server" in missing.stderr
    assert install.tool_names("../llama-server") == install.tool_names("") == []
    assert install.find_tool("server", [bin_dir]) == bin_dir / "llama-server"


def test_llama_runs_the_real_build_when_there_is_one() -> None:
    from llmserve.backends.install import find_tool

    if find_tool("server") is None:
        pytest.skip("no `llmserve install llama` build here")
    proc = subprocess.run([sys.executable, "-m", "llmserve", "llama", "server", "--version"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "version:" in proc.stdout + proc.stderr
