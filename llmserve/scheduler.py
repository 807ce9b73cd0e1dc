"""One worker thread owns the engine: every model operation runs there, in arrival order.

NOTE: llama.cpp contexts are not thread-safe, and a FIFO single worker also makes a model
switch wait for in-flight work without any extra locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Emit = Callable[[Any], None]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class EventStream:
    """Events emitted by a job on the worker thread, consumed on the event loop."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop at its next token."""
        self.cancelled.set()

    async def next(self) -> Any:
        """The next event; raises the job's exception; StopAsyncIteration at the end."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stay ended for later readers
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        return await self.next()


class Worker:
    """A single engine thread with a FIFO queue."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-engine")
        self.queued = 0  # jobs submitted and not finished (queue depth)
        self._after: list[Callable[[], None]] = []

    def after_each_job(self, hook: Callable[[], None]) -> None:
        """Run hook on the worker thread after every job, before its caller hears it ended."""
        self._after.append(hook)

    def _run_hooks(self) -> None:
        for hook in self._after:
            try:
                hook()
            except Exception:  # a hook must never break the worker
                logger.exception("after-job hook failed")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the worker thread and return its result."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(*args)
            finally:
                self._run_hooks()

        self.queued += 1
        try:
            return await loop.run_in_executor(self._executor, run)
        finally:
            self.queued -= 1

    def stream(self, job: Callable[[Emit, threading.Event], None]) -> EventStream:
        """Start job(emit, cancelled) on the worker; its emitted events arrive on the stream."""
        loop = asyncio.get_running_loop()
        stream = EventStream()

        def put(item: Any) -> None:
            # NOTE: the loop may already be closed at shutdown; nobody is listening then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stream._queue.put_nowait, item)

        def run() -> None:
            try:
                if not stream.cancelled.is_set():
                    job(put, stream.cancelled)
            except BaseException as exc:
                put(_Failure(exc))
            finally:
                self._run_hooks()
                put(_END)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._done)

        self.queued += 1
        self._executor.submit(run)
        return stream

    def _done(self) -> None:
        self.queued -= 1

    def shutdown(self) -> None:
        """Stop accepting work and wait for the running job."""
        self._executor.shutdown(wait=True, cancel_futures=True)
