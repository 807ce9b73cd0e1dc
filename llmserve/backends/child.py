"""A llama-server child process: started on a free loopback port with its own random key,
logged to ours at debug, and never orphaned.

NOTE: on Linux the child asks the kernel for SIGKILL when its parent dies
(prctl(PR_SET_PDEATHSIG)), so it goes even when llmserve is SIGKILLed; it runs in its own
process group (setsid) so a stop reaches whatever it spawned. PDEATHSIG fires when the *thread*
that forked exits, so children are only spawned from the event loop's thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
STOP_WAIT = 5.0  # seconds SIGTERM gets before SIGKILL
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the child binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # NOTE: runs in the child between fork and exec
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ChildProcess:
    """One child: Popen, a thread pumping its output into our log, stop by process group."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], tail: int = 30):
        self.name = name
        self._tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.proc = subprocess.Popen(
            list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with(os.getpid()),
        )
        self._reader = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._reader.start()
        logger.info("started llama-server for %s (pid %d)", name, self.proc.pid)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def returncode(self) -> int | None:
        """The exit status once it ended, else None."""
        return self.proc.poll()

    def tail(self) -> str:
        """Its last log lines."""
        return "\n".join(self._tail)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            logger.debug("[%s] %s", self.name, line)
        self.proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after STOP_WAIT; waits for it (any thread)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            logger.info("stopped llama-server for %s (pid %d)", self.name, self.proc.pid)
        self._reader.join(timeout=1.0)
