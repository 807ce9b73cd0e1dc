"""`llmserve install llama`: build llama-server from the llama.cpp vendored in the pinned
llama-cpp-python sdist, into a cache folder outside the repo, once per version and flags.

    pip download --no-deps --no-binary :all: llama-cpp-python==<pinned>  -> extract
    cmake -B build vendor/llama.cpp -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF ...
    cmake --build build --target llama-server -j N

`llmserve llama TOOL [ARGS...]` runs a tool from such a build (find_tool, run_tool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
STAMP = "llmserve-build.json"
BINARY = Path("build") / "bin" / "llama-server"
GPU_FLAGS = {"cpu": [], "cuda": ["-DGGML_CUDA=on"], "metal": ["-DGGML_METAL=on"]}
_REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


class InstallError(Exception):
    """The build cannot run or failed; str() is one line for the user."""


def pinned_version(requirements: Path = _REQUIREMENTS) -> str:
    """llama-cpp-python's version: the pin in requirements.txt, else the installed one."""
    try:
        for line in requirements.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^\s*llama[-_]cpp[-_]python\s*==\s*([^\s#;]+)", line)
            if match:
                return match.group(1)
    except OSError:
        pass
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise InstallError(f"no {PACKAGE} pin in {requirements} and none installed") from None


def cache_root() -> Path:
    """Where default builds live: $XDG_CACHE_HOME/llmserve/llama-server (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmserve" / "llama-server"


def default_dir(version: str, accel: str) -> Path:
    """The cache folder of one version and flag set."""
    return cache_root() / f"{version}-{accel}"


def installed_binaries() -> list[Path]:
    """Binaries `install llama` built in the default cache (the pinned version first)."""
    root = cache_root()
    if not root.is_dir():
        return []
    try:
        version = pinned_version()
    except InstallError:
        version = ""
    found = [d / BINARY for d in sorted(root.iterdir()) if (d / BINARY).is_file()]
    return sorted(found, key=lambda p: not p.parent.parent.parent.name.startswith(f"{version}-"))


def build_bins() -> list[Path]:
    """The build/bin folders `install llama` made in the default cache (the pinned first)."""
    return [binary.parent for binary in installed_binaries()]


def tool_names(tool: str) -> list[str]:
    """Binary names TOOL may mean: `server` -> llama-server, `llama-cli` as it is."""
    if not tool or "/" in tool or tool.startswith(".") or "\0" in tool:
        return []
    return [tool] if tool.startswith("llama-") else [f"llama-{tool}", tool]


def find_tool(tool: str, bins: Sequence[Path] | None = None) -> Path | None:
    """The first built binary TOOL names, in build order (pinned version first)."""
    for folder in build_bins() if bins is None else bins:
        for name in tool_names(tool):
            path = folder / name
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def run_tool(tool: str, args: Sequence[str]) -> int:
    """`llmserve llama TOOL [ARGS...]`: exec the built tool (its exit code is ours); 2 when
    there is none, with how to build it."""
    bins = build_bins()
    if not bins:
        sys.stderr.write("llmserve: no llama.cpp build found: run `llmserve install llama` "
                         f"first (it builds into {cache_root()})\n")
        return 2
    path = find_tool(tool, bins)
    if path is None:
        have = sorted({p.name for b in bins for p in b.glob("llama-*") if p.is_file()})
        sys.stderr.write(f"llmserve: no llama.cpp tool {tool!r} in {bins[0]} (built: "
                         f"{', '.join(have) or 'none'}); `llmserve install llama` builds "
                         "llama-server\n")
        return 2
    sys.stderr.flush()
    sys.stdout.flush()
    # NOTE: exec, not a child: stdin, signals and the exit status are the tool's own
    os.execv(path, [str(path), *args])


def _stamp_ok(folder: Path, version: str, accel: str) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(stamp.get("version") == version and stamp.get("accel") == accel
                and (folder / BINARY).is_file())


def _check_tools() -> None:
    if shutil.which("cmake") is None:
        raise InstallError("cmake is not installed (apt-get install cmake, or brew install "
                           "cmake): it is needed to build llama-server")
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise InstallError("no C++ compiler found (apt-get install build-essential, or "
                           "xcode-select --install): it is needed to build llama-server")


def _run(cmd: Sequence[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Run cmd, its output appended to log; progress ([ NN%]) shown on stderr."""
    sys.stderr.write(f"{what}: {' '.join(cmd)}\n")
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        last = -1
        for raw in proc.stdout:
            out.write(raw)
            match = _PERCENT.match(raw.decode(errors="replace"))
            if match and int(match.group(1)) != last:
                last = int(match.group(1))
                sys.stderr.write(f"\r{what}: {last:3d}%")
                sys.stderr.flush()
        code = proc.wait()
    if last >= 0:
        sys.stderr.write("\n")
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise InstallError(f"{what} failed with exit code {code} (log: {log}):\n"
                           + "\n".join(tail))


def _source(folder: Path, version: str) -> Path:
    """The extracted sdist (downloaded with pip once)."""
    src = folder / f"llama_cpp_python-{version}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    dl = folder / "download"
    dl.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
          ":all:", f"{PACKAGE}=={version}", "-d", str(dl)], folder / "build.log", "download")
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise InstallError(f"pip downloaded no {PACKAGE} sdist into {dl}")
    with tarfile.open(archives[-1]) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # NOTE: Python < 3.11.4: no extraction filters; refuse paths leaving folder
            root = folder.resolve()
            for member in tar.getmembers():
                target = root / member.name
                linked = (target.parent / member.linkname) if member.issym() else target
                if not all(p.resolve().is_relative_to(root) for p in (target, linked)):
                    raise InstallError(f"{archives[-1].name}: unsafe member {member.name}")
            tar.extractall(folder)
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise InstallError(f"{archives[-1].name} holds no vendor/llama.cpp")
    return src


def install_llama(accel: str = "cpu", output_dir: Path | None = None,
                  jobs: int | None = None) -> Path:
    """Build (or find already built) llama-server; returns the binary's path.

    With output_dir naming a folder that already holds build/bin/llama-server (a build made
    by hand from the same sdist, say), that binary is reused."""
    version = pinned_version()
    folder = output_dir or default_dir(version, accel)
    binary = folder / BINARY
    if _stamp_ok(folder, version, accel) or (output_dir is not None and binary.is_file()):
        sys.stderr.write(f"llama-server {version} ({accel}) already built\n")
        return binary
    _check_tools()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.log").write_bytes(b"")
    start = time.monotonic()
    src = _source(folder, version)
    build = folder / "build"
    # NOTE: static libraries, so the binary runs from wherever it is without the .so files.
    _run(["cmake", "-B", str(build), str(src / "vendor" / "llama.cpp"),
          "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", *GPU_FLAGS[accel]],
         folder / "build.log", "configure")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
          str(jobs or os.cpu_count() or 2)], folder / "build.log", "build")
    if not binary.is_file():
        raise InstallError(f"the build finished but {binary} is missing (log: "
                           f"{folder / 'build.log'})")
    (folder / STAMP).write_text(json.dumps({"version": version, "accel": accel,
                                            "binary": str(binary)}) + "\n", encoding="utf-8")
    sys.stderr.write(f"built llama-server {version} ({accel}) in "
                     f"{time.monotonic() - start:.0f} s\n")
    return binary


def find_llama_server(flag: Path | None = None) -> Path | None:
    """The llama-server to run: --llama_server, $LLAMA_SERVER, PATH, or `install llama`'s."""
    if flag is not None:
        return flag if flag.is_file() else None
    env = os.environ.get("LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = installed_binaries()
    return built[0] if built else None


def run_install(args: object) -> int:
    """The `install llama` command."""
    accel = "cuda" if getattr(args, "cuda", False) else (
        "metal" if getattr(args, "metal", False) else "cpu")
    try:
        binary = install_llama(accel, getattr(args, "output_dir", None),
                               getattr(args, "jobs", None))
    except InstallError as exc:
        sys.stderr.write(f"llmserve: {exc}\n")
        return 1
    sys.stdout.write(f"{binary}\n")
    return 0
