"""`make agents-check`: the real Claude Code and Codex CLIs against `python server.py`.

Not part of `make test` (a 20k-token prefill takes about a minute on 2 cores). It installs the
pinned CLIs from npm into ~/.cache/llmserve/agents/, starts `server.py --model_name MODEL`
with no other flag but an output cap (`--max_tokens 1024`: Codex sends no limit), blocks
every other host (HTTPS_PROXY/HTTP_PROXY at a local proxy that closes every connection), and
runs in a scratch project holding hello.py:
  claude -p ... --output-format json          claude -p ... --output-format stream-json
  codex exec ...                              codex exec --json ...
printing PASS or FAIL per check (exit status 1 on any FAIL). A check passes when the CLI ends
without an API error and the server answered every request 200; what a small model answers
is the model's business. So is a model that rambles to its output limit: both CLIs end such a
run with an error, exit status 1, as they do against OpenAI and Anthropic (Codex: "Incomplete
response returned, reason: max_output_tokens"; Claude Code, after asking the model to resume
three times, each answered stop_reason "max_tokens": a result with api_error
"max_output_tokens", "API Error: Claude's response exceeded the 1024 output token maximum"),
and the check passes with a note. Gemma 3 270M is a base model sampled at temperature 1 (no
CLI sets one), so some runs end that way and others do not. Claude Code's stderr always ends
with "[claude-code:unrecognized_model] {"model": ...}": a notice it prints at start-up for a
model name outside its own list, before any request; it changes nothing, so the check keeps
the model's file name (what the README tells users to pass) rather than a Claude-style alias.

    .venv/bin/python tests/agents_check.py [--model_name FILE] [--only claude|codex]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import started_server  # noqa: E402  (run as a script, not by pytest)

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
CODEX = "@openai/codex@0.171.0"
PROMPT = "Read hello.py and tell me in one sentence what it does."
CLI_TIMEOUT = 1800  # seconds per CLI run: a base model may ramble to its token limit


def install_clis() -> Path:
    """The pinned CLIs' bin dir, installed with npm once into the cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmserve"
    prefix = cache / "agents" / (CLAUDE_CODE.rsplit("/", 1)[1] + "_" + CODEX.rsplit("/", 1)[1])
    bin_dir = prefix / "node_modules" / ".bin"
    if not ((bin_dir / "claude").exists() and (bin_dir / "codex").exists()):
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("agents-check needs npm (Node.js) to install the agent CLIs")
        print(f"installing {CLAUDE_CODE} and {CODEX} into {prefix}", flush=True)
        subprocess.run([npm, "install", "--no-fund", "--no-audit", "--prefix", str(prefix),
                        CLAUDE_CODE, CODEX], check=True)
    return bin_dir


@contextlib.contextmanager
def dead_end_proxy() -> Iterator[str]:
    """A proxy URL on loopback that closes every connection: no request leaves the machine."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


@contextlib.contextmanager
def server(model: str, log_path: Path, cache_dir: Path) -> Iterator[str]:
    """`python server.py --model_name MODEL` on a free loopback port, defaults otherwise."""
    # NOTE: Codex sends no output limit; a small model that rambles would decode to the end
    # of its 32k context (under 10 tokens/s there on 2 cores).
    proc = started_server(log_path, "--model_name", model, "--cache_dir", str(cache_dir),
                          "--no_announce", "--max_tokens", "1024")
    try:
        yield proc.base_url
    finally:
        proc.stop()


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {CLI_TIMEOUT} s")


def claude_final(out: str) -> dict[str, Any] | None:
    """Claude Code's last JSON line on stdout (its result, when the run got that far)."""
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else None


def claude_result(out: str) -> str | None:
    """None when Claude Code's final result line says the run succeeded, else why not."""
    result = claude_final(out)
    if result is None:
        return "no JSON output"
    if result.get("type") != "result":
        return f"last line is {result.get('type')!r}, not the result"
    if result.get("is_error") or result.get("api_error_status"):
        return (f"is_error {result.get('is_error')}, api_error_status "
                f"{result.get('api_error_status')}, api_error {result.get('api_error')}: "
                f"{str(result.get('result'))[:300]}")
    claude_summary(result)
    return None


def claude_summary(result: dict[str, Any]) -> None:
    usage = result.get("usage", {})
    print(f"    turns {result.get('num_turns')}, input {usage.get('input_tokens')}, cache read "
          f"{usage.get('cache_read_input_tokens')}, output {usage.get('output_tokens')}; "
          f"result: {str(result.get('result'))[:160]!r}")


def claude_only_the_model_limit(out: str) -> bool:
    """Whether Claude Code failed only because the model used up its output limit. A response
    that ends with stop_reason "max_tokens" is held back and the model asked to resume, up to
    three more requests; when the last one ends there too, Claude Code ends the run with
    exit status 1 and a result with is_error, api_error "max_output_tokens", no HTTP status,
    and "API Error: Claude's response exceeded the N output token maximum" (as it does against
    Anthropic). A base model that rambles to its limit four times over is the model, not the
    server. (The context-window variant, stop_reason "model_context_window_exceeded", has
    the same api_error but another message, and is not excused.)"""
    result = claude_final(out)
    return (result is not None and result.get("type") == "result"
            and result.get("api_error") == "max_output_tokens"
            and result.get("api_error_status") is None
            and "output token maximum" in str(result.get("result")))


LIMIT_ERROR = "Incomplete response returned, reason: max_output_tokens"


def codex_result(out: str, as_json: bool) -> str | None:
    """None when Codex's output shows a completed turn, else why not."""
    if not as_json:
        return None if out.strip() else "no final message on stdout"
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    kinds = [e.get("type") for e in events]
    if "turn.failed" in kinds or "error" in kinds:
        return json.dumps([e for e in events if e.get("type") in ("turn.failed", "error")])[:400]
    if "turn.completed" not in kinds:
        return f"no turn.completed event (events: {kinds[-5:]})"
    usage = next(e for e in events if e.get("type") == "turn.completed").get("usage", {})
    print(f"    usage {usage}")
    return None


def only_the_model_limit(done: subprocess.CompletedProcess[str]) -> bool:
    """Whether Codex failed only because the model used up its output limit: Codex reports a
    response cut at max_output_tokens as an error (as it does against OpenAI). A base model
    that rambles to its limit is the model, not the server."""
    errors = [line for line in (done.stdout + done.stderr).splitlines()
              if line.startswith("ERROR")]
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("type") in ("error", "turn.failed"):
                errors.append(json.dumps(event))
    return bool(errors) and all("max_output_tokens" in line for line in errors)


def server_errors(log: str, since: int) -> list[str]:
    """The API requests in the server log (from offset since) not answered 200."""
    return [line for line in log[since:].splitlines()
            if '"POST ' in line and "HTTP/1.1" in line and '" 200' not in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_name", default="gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--only", choices=("claude", "codex"))
    args = ap.parse_args()
    bin_dir = install_clis()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="agents-check-") as tmp, dead_end_proxy() as proxy:
        work = Path(tmp)
        project, home, codex_home = work / "project", work / "home", work / "codex"
        for d in (project, home, codex_home):
            d.mkdir()
        (project / "hello.py").write_text('print("hello")\n')
        log = work / "server.log"
        with server(args.model_name, log, work / "cache") as base:
            env = {**os.environ, "HOME": str(home), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy,
                   "https_proxy": proxy, "http_proxy": proxy,
                   "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
            claude_env = {**env, "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": "dummy",
                          "ANTHROPIC_DEFAULT_HAIKU_MODEL": args.model_name,
                          # NOTE: Claude Code asks for 32000 tokens; a small model that rambles
                          # would take many minutes to reach that on 2 cores.
                          "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "1024",
                          "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
            (codex_home / "config.toml").write_text(
                f'model = "{args.model_name}"\nmodel_provider = "llmserve"\n\n'
                '[model_providers.llmserve]\nname = "llmserve"\n'
                f'base_url = "{base}/v1"\nwire_api = "responses"\n')
            codex_env = {**env, "CODEX_HOME": str(codex_home)}
            claude = [str(bin_dir / "claude"), "-p", PROMPT, "--model", args.model_name,
                      "--max-turns", "4"]
            codex = [str(bin_dir / "codex"), "exec", "--skip-git-repo-check"]
            checks: list[tuple[str, str, list[str], dict[str, str],
                               Callable[[str], str | None]]] = [
                ("claude", "claude -p --output-format json",
                 [*claude, "--output-format", "json"], claude_env, claude_result),
                ("claude", "claude -p --output-format stream-json",
                 [*claude, "--output-format", "stream-json", "--verbose"], claude_env,
                 claude_result),
                ("codex", "codex exec", [*codex, PROMPT], codex_env,
                 lambda out: codex_result(out, False)),
                ("codex", "codex exec --json", [*codex, "--json", PROMPT], codex_env,
                 lambda out: codex_result(out, True)),
            ]
            for kind, name, cmd, cmd_env, judge in checks:
                if args.only and kind != args.only:
                    continue
                start, since = time.monotonic(), len(log.read_text(errors="replace"))
                done = run(cmd, cmd_env, project)
                note = ""
                if done.returncode and kind == "codex" and only_the_model_limit(done):
                    why, note = None, " (the model reached its output limit: Codex reports " \
                        "that as an incomplete response; every request was answered)"
                elif done.returncode and kind == "claude" and \
                        claude_only_the_model_limit(done.stdout):
                    claude_summary(claude_final(done.stdout) or {})
                    why, note = None, " (the model reached its output limit on every try: " \
                        "Claude Code reports that as API error max_output_tokens; every " \
                        "request was answered)"
                elif done.returncode:
                    # NOTE: Claude Code's stderr ends with its "[claude-code:unrecognized_model]"
                    # notice for any model name it does not know, printed at start-up: harmless,
                    # and not why a run failed; its result line says why.
                    detail = judge(done.stdout) if kind == "claude" else None
                    why = f"exit status {done.returncode}: " + \
                        (detail or done.stderr.strip()[-400:])
                else:
                    why = judge(done.stdout)
                refused = server_errors(log.read_text(errors="replace"), since)
                if refused and why is None:
                    why = "the server refused requests: " + " | ".join(refused)[:400]
                answered = log.read_text(errors="replace")[since:].count('" 200')
                took = time.monotonic() - start
                print(f"{'PASS' if why is None else 'FAIL'} {name} ({took:.0f} s, {answered} "
                      f"requests answered 200){note}" + ("" if why is None else f": {why}"),
                      flush=True)
                failures += why is not None
        if failures:
            print("--- server log (tail) ---\n" + log.read_text(errors="replace")[-3000:])
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
