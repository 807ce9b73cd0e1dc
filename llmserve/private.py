"""Owner-only files: what the server writes (stored Responses, the prompt cache, downloads,
logs) is 0600 in 0700 folders, whatever the umask it was started with. Imports nothing of ours.

NOTE: two layers. The process umask is set to PRIVATE_UMASK where the process starts
(`llmserve` CLI, create_app), which covers files other libraries create (diskcache, SQLite);
files we create ourselves also pass an explicit mode (write_private, open_private), so they
stay private in a host process that sets its own umask later. `tighten` fixes files left
group/other-readable by versions before this.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700


def restrict_umask() -> int:
    """Set the process umask to 0o077 (new files 0600, folders 0700); returns the old one."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> None:
    """mkdir -p path, each folder it creates 0700 (the umask can only take bits away)."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
            os.chmod(folder, DIR_MODE)


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600 for a new file; an existing one is made 0600 too."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Create or truncate path (0600) and write data."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def tighten(root: Path) -> int:
    """chmod go-rwx on root and everything under it (symlinks not followed); how many changed."""
    changed = 0
    if not root.is_dir() or root.is_symlink():
        return 0
    for path in (root, *_walk(root)):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            continue
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
            changed += 1
    return changed


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for folder, dirs, files in os.walk(root, onerror=None, followlinks=False):
        base = Path(folder)
        out.extend(base / d for d in dirs)
        out.extend(base / f for f in files)
    return out
