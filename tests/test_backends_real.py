"""Backends on real processes (issue 11): llama-server children built by `llmserve install
llama` (make test builds it once per machine), an openai backend against a real llama-server
and a second llmserve. Every process is on 127.0.0.1 and stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmserve.backends.install import find_llama_server, installed_binaries
from tests.conftest import (
    MODELS_DIR,
    ROOT,
    SMOL,
    ServerProcess,
    free_port,
    require_model,
    started_server,
)

pytestmark = pytest.mark.real_model
CHAT = [{"role": "user", "content": "Say hi."}]
LOAD = "{n_ctx: 1024, n_threads: 1, parallel: 2}"


@pytest.fixture(scope="module")
def llama_server() -> Path:
    # NOTE: the one `make test` built (llmserve install llama) unless LLAMA_SERVER names another
    built = installed_binaries()
    found = find_llama_server(None) if os.environ.get("LLAMA_SERVER") or not built else built[0]
    if found is None:
        pytest.skip("llama-server missing: run `make test` (it runs `llmserve install llama`)")
    require_model(SMOL)
    return found


def _gone(pid: int) -> bool:
    """Whether pid has exited (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def _row(base: str, name: str) -> dict[str, Any]:
    models = httpx.get(f"{base}/models", timeout=30).json()["models"]
    return next(m for m in models if m["name"] == name)


def _chat(base: str, model: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": CHAT, "max_tokens": 4, **kw})


def _sdk(base: str) -> openai.OpenAI:
    """The openai SDK on llmserve (use it in `with`: closed after, no leaked socket)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _manifest(path: Path, entries: str) -> Path:
    path.write_text(f"version: 1\nmodels:\n{entries}")
    return path


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy in {timeout} s")


@pytest.fixture(scope="module")
def stack(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A plain llama-server (key ls-key), a second llmserve (key lm-key), and llmserve with
    llama_server and openai entries in front of them."""
    tmp = tmp_path_factory.mktemp("backends")
    ls_port = free_port()
    cmd = [str(llama_server), "-m", str(MODELS_DIR / SMOL), "--host", "127.0.0.1", "--port",
           str(ls_port), "-c", "1024", "-t", "1", "-np", "1", "--api-key", "ls-key",
           "--no-webui"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process(cmd, tmp / "llama-server.log"))
        second = stack.enter_context(_server(tmp / "second.log", "--model_name", SMOL,
                                             "--n_threads", "1", "--n_ctx", "1024",
                                             "--api_key", "lm-key", "--no_announce"))
        _healthy(f"http://127.0.0.1:{ls_port}/health")
        down = free_port()
        manifest = _manifest(tmp / "models.yaml", f"""\
  smol-child:
    path: {SMOL}
    backend: llama_server
    load: {LOAD}
  smol-once:
    path: {SMOL}
    backend: llama_server
    load: {LOAD}
  smol-embed:
    path: {SMOL}
    backend: llama_server
    load: {{n_ctx: 512, n_threads: 1, parallel: 1}}
    args: [--embeddings, --pooling, mean]
  broken:
    path: {SMOL}
    backend: llama_server
    args: [--no-such-flag]
  remote-ls:
    backend: openai
    base_url: http://127.0.0.1:{ls_port}/v1
    api_key_env: TEST_LS_KEY
  remote-llmserve:
    backend: openai
    base_url: {second.base_url}/v1
    api_key_env: TEST_LM_KEY
    upstream_model: {SMOL}
  remote-badkey:
    backend: openai
    base_url: {second.base_url}/v1
    api_key_env: TEST_UNSET_KEY
  remote-down:
    backend: openai
    base_url: http://127.0.0.1:{down}/v1
""")
        os.environ.update(TEST_LS_KEY="ls-key", TEST_LM_KEY="lm-key")
        os.environ.pop("TEST_UNSET_KEY", None)
        front = stack.enter_context(_server(
            tmp / "front.log", "--model_name", SMOL, "--n_threads", "1", "--n_ctx", "1024",
            "--manifest", str(manifest), "--llama_server", str(llama_server),
            "--max_loaded_models", "6", "--log_level", "debug", "--no_announce"))
        stack.callback(lambda: [os.environ.pop(k, None) for k in ("TEST_LS_KEY", "TEST_LM_KEY")])
        yield {"base": front.base_url, "server": front}


@contextlib.contextmanager
def _server(log: Path, *args: str) -> Iterator[ServerProcess]:
    server = started_server(log, *args)
    try:
        yield server
    finally:
        server.stop()


def test_chat_and_stream_through_the_sdk(stack: dict[str, Any]) -> None:
    base = stack["base"]
    with _sdk(base) as client:
        _chat_and_stream(client, base)
    # its log goes to ours at debug
    assert "[smol-child]" in stack["server"].log()


def _chat_and_stream(client: openai.OpenAI, base: str) -> None:
    reply = client.chat.completions.create(model="smol-child", messages=CHAT, max_tokens=6)
    assert reply.model == "smol-child" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smol-child", messages=CHAT, max_tokens=6, stream=True) if c.choices]
    assert "".join(pieces)
    row = _row(base, "smol-child")
    assert (row["backend"], row["state"]) == ("llama_server", "ready")
    assert not _gone(row["pid"])
    text = client.completions.create(model="smol-child", prompt="Once upon a", max_tokens=4)
    assert text.choices[0].text


def test_tokenize_detokenize_restore_cache(stack: dict[str, Any]) -> None:
    base = stack["base"]
    tokens = httpx.post(f"{base}/tokenize", json={"model": "smol-child",
                                                  "content": "hello world"}).json()["tokens"]
    local = httpx.post(f"{base}/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert tokens == local
    back = httpx.post(f"{base}/detokenize", json={"model": "smol-child", "tokens": tokens})
    assert back.json()["content"] == "hello world"
    warm = httpx.post(f"{base}/restore_cache", timeout=60,
                      json={"model": "smol-child", "messages": CHAT}).json()
    assert warm["model"] == "smol-child" and warm["prompt_tokens"] > 0
    again = httpx.post(f"{base}/restore_cache", timeout=60,
                       json={"model": "smol-child", "messages": CHAT}).json()
    assert again["cached_tokens"] > 0


def test_embeddings(stack: dict[str, Any]) -> None:
    with _sdk(stack["base"]) as client:
        result = client.embeddings.create(model="smol-embed", input=["hello", "a cat"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 576 and result.model == "smol-embed"


def test_keep_alive_zero_frees_the_process(stack: dict[str, Any]) -> None:
    base = stack["base"]
    assert _chat(base, "smol-once").status_code == 200
    pid = _row(base, "smol-once")["pid"]
    assert _chat(base, "smol-once", keep_alive=0).status_code == 200
    assert _wait_gone(pid)
    assert _row(base, "smol-once")["state"] == "stopped"
    # a keep_alive that runs out: the idle reaper stops it
    assert _chat(base, "smol-once", keep_alive="1s").status_code == 200
    pid = _row(base, "smol-once")["pid"]
    assert _wait_gone(pid)
    assert _row(base, "smol-once")["state"] == "stopped"


def test_a_child_killed_mid_stream_gives_an_error_event_and_recovers(
        stack: dict[str, Any]) -> None:
    base = stack["base"]
    assert _chat(base, "smol-child").status_code == 200
    pid = _row(base, "smol-child")["pid"]
    events = []
    body = {"model": "smol-child", "messages": CHAT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "backend_error" and error["type"] == "bad_gateway"
    r = _chat(base, "smol-child")
    assert r.status_code == 200, r.text
    assert _row(base, "smol-child")["pid"] != pid


def test_a_child_that_cannot_start_reports_its_exit(stack: dict[str, Any]) -> None:
    base = stack["base"]
    r = _chat(base, "broken")
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["code"] == "backend_start_failed"
    assert "exited with code" in error["message"] and "no-such-flag" in error["message"]
    assert _row(base, "broken")["state"] == "error"
    assert _chat(base, SMOL).status_code == 200  # the in-process model serves on


def test_openai_backend_against_real_servers(stack: dict[str, Any]) -> None:
    base = stack["base"]
    with _sdk(base) as client:
        for model in ("remote-ls", "remote-llmserve"):
            reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
            assert reply.model == model and reply.choices[0].message.content
            chunks = list(client.chat.completions.create(
                model=model, messages=CHAT, max_tokens=4, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = _chat(base, "remote-badkey")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _chat(base, "remote-down")
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    listing = httpx.get(f"{base}/models").text
    assert "ls-key" not in listing and "lm-key" not in listing


def test_sigkill_leaves_no_child_and_switching_stops_it(
        llama_server: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "models.yaml",
                         f"  smol-child:\n    path: {SMOL}\n    backend: llama_server\n"
                         f"    load: {LOAD}\n")
    server = ServerProcess(tmp_path / "server.log", "--model_name", SMOL, "--n_threads", "1",
                           "--manifest", str(manifest), "--llama_server", str(llama_server),
                           "--max_loaded_models", "1", "--no_announce")
    try:
        server.wait_ready()
        base = server.base_url
        assert _chat(base, "smol-child").status_code == 200
        first = _row(base, "smol-child")["pid"]
        # one model at a time: the in-process model's next request stops the child
        assert _chat(base, SMOL).status_code == 200
        assert _wait_gone(first)
        # switching to it makes it the model requests naming none go to
        r = httpx.post(f"{base}/setModel", json={"modelName": "smol-child"}, timeout=120)
        assert r.json() == {"status": "ok", "model": "smol-child"}
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                           json={"messages": CHAT, "max_tokens": 2}).json()
        assert reply["model"] == "smol-child"
        second = _row(base, "smol-child")["pid"]
        assert _row(base, SMOL)["loaded"] is False
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert _wait_gone(second), "the llama-server child outlived llmserve"
    finally:
        server.stop()


def test_a_child_never_healthy_does_not_hang_the_server(tmp_path: Path) -> None:
    require_model(SMOL)
    sleeper = tmp_path / "llama-server"
    sleeper.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    sleeper.chmod(0o755)
    manifest = _manifest(tmp_path / "models.yaml",
                         f"  sleepy:\n    path: {SMOL}\n    backend: llama_server\n")
    server = started_server(tmp_path / "server.log", "--model_name", SMOL, "--n_threads", "1",
                            "--manifest", str(manifest), "--llama_server", str(sleeper),
                            "--backend_start_timeout", "3", "--max_loaded_models", "2",
                            "--no_announce")
    try:
        base = server.base_url
        result: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=lambda: result.update(r=_chat(base, "sleepy")))
        waiting.start()
        while "state" not in _row(base, "sleepy") or _row(base, "sleepy")["state"] != "starting":
            assert waiting.is_alive(), result
            time.sleep(0.05)
        assert _chat(base, SMOL).status_code == 200  # served while the child starts
        waiting.join(60)
        r = result["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_start_timeout"
        assert "did not become healthy within 3 s" in r.json()["error"]["message"]
        assert _row(base, "sleepy")["state"] == "error"
    finally:
        server.stop()


def test_a_missing_executable_is_a_manifest_error(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "models.yaml",
                         f"  smol-child:\n    path: {SMOL}\n    backend: llama_server\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--models_dir", str(MODELS_DIR),
         "--manifest", str(manifest), "--llama_server", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert f"{manifest}:5: models.smol-child.backend: --llama_server" in done.stderr


def test_peer_routing_on_loopback(tmp_path: Path) -> None:
    """--peers auto: a model only the peer has goes there (with --peer_api_key); the peer is
    listed with its node and dropped once it is gone."""
    require_model(SMOL)
    unique = f"peer-{os.getpid()}-{free_port()}"
    manifest = _manifest(tmp_path / "models.yaml",
                         f"  smol-peer:\n    path: {SMOL}\n    aliases: [{unique}]\n")
    peer = started_server(tmp_path / "peer.log", "--model_name", SMOL, "--n_threads", "1",
                          "--n_ctx", "1024", "--manifest", str(manifest), "--api_key", "pk-1")
    front = None
    try:
        front = started_server(tmp_path / "front.log", "--model_name", SMOL, "--n_threads",
                               "1", "--n_ctx", "1024", "--peers", "auto", "--peer_api_key",
                               "pk-1", "--no_announce",
                               "--manifest", str(tmp_path / "none.yaml"))
        base = front.base_url
        deadline = time.monotonic() + 30
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = [m for m in httpx.get(f"{base}/models").json()["models"]
                    if m["name"] == unique]
            if rows:
                break
            time.sleep(0.2)
        assert rows, "the peer's model never showed up"
        assert rows[0]["backend"] == "peer" and rows[0]["node"].endswith(f"-{peer.port}")
        r = _chat(base, unique)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == unique
        assert "pk-1" not in httpx.get(f"{base}/models").text
        peer.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                m["name"] == unique for m in httpx.get(f"{base}/models").json()["models"]):
            time.sleep(0.2)
        assert _chat(base, unique).status_code == 404
    finally:
        peer.stop()
        if front is not None:
            front.stop()
